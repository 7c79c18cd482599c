#!/usr/bin/env bash
# launch/tpu_pod.sh - run capjax training on a Cloud TPU VM slice (TPU v5e by default).
#
# Lifecycle: create -> install -> run -> (logs | status | ssh | stop) -> delete.
# Every gcloud call goes through x() / query(), so --dry-run prints the exact
# commands (shell-quoted, one per line, prefixed with "+ ") and runs none.
# See `launch/tpu_pod.sh --help` and docs/tpu_pod.md.
set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# Seconds between polls (queued-resource state, end of training). Tests lower it.
POLL_SECONDS=${TPU_POD_POLL_SECONDS:-30}
REMOTE_TARBALL=capjax-src.tar.gz

usage() {
  cat <<'EOF'
Usage: tpu_pod.sh COMMAND --tpu NAME --zone ZONE --project PROJECT [OPTIONS] [-- ARGS...]

Create a Cloud TPU VM slice, install capjax on every worker, train on all of
them at once, watch it, and delete the slice. Options may come before or after
COMMAND; "--opt VALUE" and "--opt=VALUE" both work.

Commands:
  create    Create the slice, or reuse it if it exists (checked with `describe`).
            A queued resource that was preempted (SUSPENDED) or FAILED is deleted
            and requested again; the command waits until the slice is ACTIVE.
  install   Put the code on every worker (--worker=all), create a venv and
            `pip install -e '.[tpu]'` into it. Default: copy this local checkout
            (tracked and untracked-but-not-ignored files, as one tarball sent with
            `gcloud compute tpus tpu-vm scp --worker=all`; no .git, no .venv).
            With --repo URL [--ref REF]: `git clone`/`git fetch` on each worker.
  run       Start `python -m capjax.train --config=NAME --workdir=DIR [ARGS]` on
            all workers at once (nohup, one log file per worker, env
            CAPJAX_MULTIHOST=1), then follow worker 0's log until training ends
            (Ctrl-C stops following; training keeps running). A trainer that is
            still running is stopped first (SIGTERM: it saves a checkpoint).
  logs      Show a worker's training log and follow it.
  status    Queued-resource and TPU VM state, and the trainer state per worker.
  ssh       Interactive shell on --worker, or run `-- CMD...` on --worker (N|all).
  stop      SIGTERM the trainer on every worker (it checkpoints) and wait for it.
  delete    Delete the slice and its queued resource. Asks first unless --yes.
  all       create -> install -> run; with --delete-after also wait until the
            trainer has exited on every worker, then delete the slice.

Required for every command:
  --tpu NAME              TPU VM (node) name; also used as the queued-resource id.
  --zone ZONE             Zone with v5e capacity, e.g. us-west4-a, us-east5-b, europe-west4-b.
  --project PROJECT       Google Cloud project id.

create / all:
  --accelerator-type T    Slice type, e.g. v5litepod-8, v5litepod-64, v5litepod-256 (required).
  --version V             TPU VM runtime image. Default by type: v5litepod-* -> v2-alpha-tpuv5-lite,
                          v5p-* -> v2-alpha-tpuv5, v6e-* -> v2-alpha-tpuv6e, others -> tpu-ubuntu2204-base.
  --spot                  Spot capacity: much cheaper, can be preempted at any time, no 24 h limit.
  --preemptible           Alias of --spot (Spot VMs supersede legacy preemptible TPUs; queued
                          resources only accept --spot).
  --reserved              Use the project's reserved capacity.
  --direct                Create with `gcloud compute tpus tpu-vm create` instead of a queued resource.
  --wait-timeout SECS     Fail if the queued resource is not ACTIVE after SECS (default 0 = wait forever).
  --create-flag FLAG      Extra flag for the gcloud create command (repeatable),
                          e.g. --create-flag=--network=my-net --create-flag=--labels=team=vlm.

install / all:
  --repo URL              Git URL to clone on the workers (default: copy the local checkout).
  --ref REF               Branch, tag or commit to check out with --repo (default: the remote's HEAD).
  --src DIR               Local checkout to copy (default: the checkout this script lives in).
  --python PY             Python >= 3.11 on the workers for the venv (default: the first of python3.13,
                          python3.12, python3.11, python3 that is >= 3.11; otherwise python3.11 is
                          installed with apt-get, as the v5e image ships Python 3.10).

run / all:
  --config NAME           Preset configs/NAME.py, or a path to a config file (required).
  --workdir DIR           Checkpoints and metrics. On a multi-host slice use gs://BUCKET/PATH so that
                          every worker sees the same directory and it outlives the slice (required).
  --env KEY=VALUE         Extra environment for the trainer (repeatable), e.g. --env=WANDB_MODE=online.
  --no-follow             Start training and return instead of following worker 0's log.
  --delete-after          (all) After training ends on every worker, delete the slice without asking.
  --stop-timeout SECS     How long a running trainer gets to checkpoint after SIGTERM (default 300).
  -- ARGS...              Passed to the trainer verbatim, e.g. -- --config.train.batch_size=4096.

logs / ssh:
  --worker N|all          Worker index (default 0).
  --lines N               logs: lines of history to show first (default 100).
  --no-follow             logs: print and exit instead of following.
  -- CMD...               ssh: run CMD instead of opening a shell.

Common:
  --remote-dir DIR        Code on the workers, relative to $HOME unless absolute (default capjax).
  --venv DIR              Virtualenv on the workers (default capjax-venv).
  --log-dir DIR           Training logs on the workers (default capjax-logs); the current run's
                          log is DIR/train.log (a link to DIR/train-<UTC time>.log).
  --internal-ip           ssh/scp through internal IPs (from a machine inside the VPC).
  --ssh-arg FLAG          Extra flag for every `gcloud compute tpus tpu-vm ssh/scp` (repeatable),
                          e.g. --ssh-arg=--tunnel-through-iap.
  -y, --yes               Do not ask before deleting.
  -n, --dry-run           Print every command, exactly as it would run (shell-quoted, one per line,
                          prefixed with "+ "), instead of running it. gcloud is never called; state
                          queries are printed and treated as "does not exist yet".
  -h, --help              Show this help.

Spot v5e: queued resources vs `tpu-vm create`
  Both `gcloud compute tpus queued-resources create --spot` and `gcloud compute tpus tpu-vm create
  --spot` exist today. Queued resources are Google's recommended way to get Spot TPUs and large
  slices: the request waits in a queue until capacity frees up (WAITING_FOR_RESOURCES ->
  PROVISIONING -> ACTIVE) instead of failing at once for lack of capacity, and after a Spot
  preemption the request shows SUSPENDED, so `create` knows to delete it and queue a new one.
  This script therefore uses queued resources by default (the node id equals --tpu, so every
  `tpu-vm ssh/scp` command works unchanged); --direct uses `tpu-vm create` for small on-demand
  slices that you want now or not at all.

Multi-host
  A slice has one VM ("worker") per host and the trainer runs once on every worker. On Cloud
  TPU VMs, jax.distributed.initialize() with no arguments reads the coordinator address, the
  number of processes and this process's index from the TPU metadata, so no coordinator flags
  are needed. `run` exports CAPJAX_MULTIHOST=1, which tells capjax.train to call it.

Preemption and resuming
  The trainer saves a checkpoint on SIGTERM and every checkpoint.every steps, and rerunning the
  same command with the same --workdir resumes from the latest checkpoint in it (a gs:// workdir
  works through orbax and survives the slice). After a Spot preemption run the same `all`
  command again (or create + install + run): the SUSPENDED queued resource is replaced, the code
  reinstalled, and training resumes. Changing a hyperparameter in between is just `run` again
  with different `-- --config.x=y` overrides.

Example: CapPa L/16 on a Spot v5litepod-256 (64 workers x 4 chips):
  launch/tpu_pod.sh all --tpu=cappa-l16 --zone=us-west4-a --project=my-project \
      --accelerator-type=v5litepod-256 --spot \
      --config=cappa_l16_datacomp --workdir=gs://my-bucket/capjax/cappa_l16 \
      --env=WANDB_MODE=online -- --config.train.batch_size=8192
  launch/tpu_pod.sh status --tpu=cappa-l16 --zone=us-west4-a --project=my-project
  launch/tpu_pod.sh logs   --tpu=cappa-l16 --zone=us-west4-a --project=my-project --worker=3
  launch/tpu_pod.sh delete --tpu=cappa-l16 --zone=us-west4-a --project=my-project
  Add --dry-run to any of these to see the gcloud commands first.

Exit status: 0 on success, 2 for a usage error (one line naming the problem), 1 otherwise.
EOF
}

die_usage() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# Messages: in --dry-run they are "# " lines among the printed commands (fd 3 is
# the original stdout, so this works inside $(...)); otherwise on stderr.
note() {
  if ((DRY_RUN)); then printf '# %s\n' "$*" >&3; else printf '%s: %s\n' "$PROG" "$*" >&2; fi
}

# q STRING: REPLY := STRING quoted for a POSIX shell (bare if it is safe; for
# --flag=VALUE only VALUE is quoted).
q() {
  local s=$1 out="'"
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    REPLY=$s
    return
  fi
  if [[ $s =~ ^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.+)$ ]]; then
    local flag=${BASH_REMATCH[1]}
    q "${BASH_REMATCH[2]}"
    REPLY=$flag$REPLY
    return
  fi
  while [[ $s == *"'"* ]]; do
    out+="${s%%"'"*}'\\''"
    s=${s#*"'"}
  done
  REPLY="$out$s'"
}

# qjoin ARGS...: REPLY := the arguments quoted and joined with spaces.
qjoin() {
  local out="" a
  for a in "$@"; do
    q "$a"
    out+="${out:+ }$REPLY"
  done
  REPLY=$out
}

# x CMD...: run a command (echoed to stderr like `set -x`), or print it in --dry-run.
x() {
  qjoin "$@"
  if ((DRY_RUN)); then
    printf '+ %s\n' "$REPLY" >&3
    return 0
  fi
  printf '+ %s\n' "$REPLY" >&2
  "$@"
}

# query CMD...: run a read-only command, stdout only. In --dry-run print it and
# fail, i.e. behave as if the resource did not exist.
query() {
  if ((DRY_RUN)); then
    qjoin "$@"
    printf '+ %s\n' "$REPLY" >&3
    return 1
  fi
  "$@" 2>/dev/null
}

# rpath PATH: REPLY := a shell expression for PATH on a worker; relative paths
# are under the worker's home directory.
rpath() {
  local p=${1#\~/}
  case $p in
    "" | . | ./ | "~" | / | //) die_usage "refusing to use '$1' as a directory on the workers" ;;
  esac
  q "$p"
  if [[ $p != /* ]]; then REPLY="\"\$HOME\"/$REPLY"; fi
}

default_version() {
  case $1 in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

# ---------------------------------------------------------------- options ---
COMMAND=""
TPU="" ZONE="" PROJECT="" ACCEL="" VERSION=""
SPOT=0 RESERVED=0 DIRECT=0 WAIT_TIMEOUT=0
REPO="" REF="" SRC=$REPO_ROOT PYTHON=""
CONFIG="" WORKDIR="" FOLLOW=1 DELETE_AFTER=0 STOP_TIMEOUT=300
WORKER=0 LINES=100
REMOTE_DIR=capjax VENV_DIR=capjax-venv LOG_DIR=capjax-logs
INTERNAL_IP=0 YES=0 DRY_RUN=0
ENVS=() CREATE_FLAGS=() SSH_ARGS=() PASS=()

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# set_opt NAME VALUE: store a valued option; unknown names are usage errors.
set_opt() {
  local name=$1 val=$2
  case $name in
    --tpu) TPU=$val ;;
    --zone) ZONE=$val ;;
    --project) PROJECT=$val ;;
    --accelerator-type) ACCEL=$val ;;
    --version) VERSION=$val ;;
    --wait-timeout) is_uint "$val" || die_usage "--wait-timeout needs a number of seconds, got '$val'"; WAIT_TIMEOUT=$val ;;
    --create-flag) CREATE_FLAGS+=("$val") ;;
    --repo) REPO=$val ;;
    --ref) REF=$val ;;
    --src) SRC=$val ;;
    --python) PYTHON=$val ;;
    --config) CONFIG=$val ;;
    --workdir) WORKDIR=$val ;;
    --env)
      [[ $val =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die_usage "--env needs KEY=VALUE, got '$val'"
      ENVS+=("$val") ;;
    --stop-timeout) is_uint "$val" || die_usage "--stop-timeout needs a number of seconds, got '$val'"; STOP_TIMEOUT=$val ;;
    --worker) [[ $val == all ]] || is_uint "$val" || die_usage "--worker needs a worker index or 'all', got '$val'"; WORKER=$val ;;
    --lines) is_uint "$val" || die_usage "--lines needs a number, got '$val'"; LINES=$val ;;
    --remote-dir) REMOTE_DIR=$val ;;
    --venv) VENV_DIR=$val ;;
    --log-dir) LOG_DIR=$val ;;
    --ssh-arg) SSH_ARGS+=("$val") ;;
    --spot | --preemptible | --reserved | --direct | --no-follow | --delete-after | --internal-ip | --yes | --dry-run | --help)
      die_usage "option $name takes no value" ;;
    *) die_usage "unknown option $name (see --help)" ;;
  esac
}

while (($#)); do
  arg=$1
  shift
  case $arg in
    --) PASS=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    -n | --dry-run) DRY_RUN=1 ;;
    -y | --yes) YES=1 ;;
    --spot | --preemptible) SPOT=1 ;;
    --reserved) RESERVED=1 ;;
    --direct) DIRECT=1 ;;
    --no-follow) FOLLOW=0 ;;
    --delete-after) DELETE_AFTER=1 ;;
    --internal-ip) INTERNAL_IP=1 ;;
    --*=*) set_opt "${arg%%=*}" "${arg#*=}" ;;
    --*)
      case $arg in
        --tpu | --zone | --project | --accelerator-type | --version | --wait-timeout | --create-flag | \
          --repo | --ref | --src | --python | --config | --workdir | --env | --stop-timeout | --worker | \
          --lines | --remote-dir | --venv | --log-dir | --ssh-arg)
          (($#)) || die_usage "option $arg needs a value"
          # "--tpu --dry-run" is a forgotten value, not a TPU named --dry-run;
          # only --create-flag and --ssh-arg take flags as values.
          if [[ $1 == -* && $arg != --create-flag && $arg != --ssh-arg ]]; then
            die_usage "option $arg needs a value (got '$1')"
          fi
          set_opt "$arg" "$1"
          shift ;;
        *) die_usage "unknown option $arg (see --help)" ;;
      esac ;;
    -*) die_usage "unknown option $arg (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die_usage "unexpected argument '$arg' (trainer arguments go after --)"
      COMMAND=$arg ;;
  esac
done

COMMANDS="create install run logs status ssh stop delete all"
case $COMMAND in
  create | install | run | logs | status | ssh | stop | delete | all) ;;
  "") die_usage "no command given (one of: $COMMANDS; see --help)" ;;
  *) die_usage "unknown command '$COMMAND' (one of: $COMMANDS)" ;;
esac

require() { # require VALUE OPTION-HINT
  [[ -n $1 ]] || die_usage "missing required option $2 (see --help)"
}
require "$TPU" "--tpu NAME"
require "$ZONE" "--zone ZONE"
require "$PROJECT" "--project PROJECT"
case $COMMAND in
  create | all) require "$ACCEL" "--accelerator-type TYPE (e.g. v5litepod-256)" ;;
esac
case $COMMAND in
  run | all)
    require "$CONFIG" "--config NAME"
    require "$WORKDIR" "--workdir DIR" ;;
esac
if ((${#PASS[@]})); then
  case $COMMAND in
    run | all | ssh) ;;
    *) die_usage "arguments after -- are only used by run, all and ssh" ;;
  esac
fi
if [[ $COMMAND == ssh && $WORKER == all && ${#PASS[@]} -eq 0 ]]; then
  die_usage "an interactive shell needs a single --worker N (or give a command after --)"
fi
[[ -n $VERSION ]] || VERSION=$(default_version "$ACCEL")

exec 3>&1
if ((DRY_RUN)); then
  note "dry-run: these commands would run; nothing is executed"
else
  command -v gcloud >/dev/null 2>&1 ||
    die "gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
fi

LOC=(--zone="$ZONE" --project="$PROJECT")
SSHX=()
if ((INTERNAL_IP)); then SSHX+=(--internal-ip); fi
if ((${#SSH_ARGS[@]})); then SSHX+=("${SSH_ARGS[@]}"); fi
rpath "$REMOTE_DIR"; R_CODE=$REPLY
rpath "$VENV_DIR"; R_VENV=$REPLY
rpath "$LOG_DIR"; R_LOGS=$REPLY
R_PID=$R_LOGS/train.pid
R_LOG=$R_LOGS/train.log

# tpu_ssh WORKER SCRIPT: run SCRIPT on one worker or on all of them at once.
tpu_ssh() {
  x gcloud compute tpus tpu-vm ssh "$TPU" "${LOC[@]}" --worker="$1" ${SSHX[@]+"${SSHX[@]}"} --command="$2"
}
tpu_ssh_query() {
  query gcloud compute tpus tpu-vm ssh "$TPU" "${LOC[@]}" --worker="$1" ${SSHX[@]+"${SSHX[@]}"} --command="$2"
}

qr_state() {
  query gcloud compute tpus queued-resources describe "$TPU" "${LOC[@]}" --format='value(state.state)'
}
node_state() {
  query gcloud compute tpus tpu-vm describe "$TPU" "${LOC[@]}" --format='value(state)'
}

# wait_state qr|node WANTED: poll until the queued resource / node reaches WANTED.
wait_state() {
  local kind=$1 want=$2 state last="" fails=0 start=$SECONDS
  if ((DRY_RUN)); then
    if [[ $kind == qr ]]; then qr_state || true; else node_state || true; fi
    note "(repeated every ${POLL_SECONDS}s until the state is $want)"
    return 0
  fi
  while :; do
    if [[ $kind == qr ]]; then state=$(qr_state) || state=""; else state=$(node_state) || state=""; fi
    case $state in
      "$want") note "$TPU is $want"; return 0 ;;
      FAILED | SUSPENDED | PREEMPTED | TERMINATED)
        die "$TPU is $state; details: gcloud compute tpus queued-resources describe $TPU --zone=$ZONE --project=$PROJECT" ;;
      "")
        fails=$((fails + 1))
        ((fails < 10)) || die "cannot read the state of $TPU (describe failed 10 times in a row)" ;;
      *) fails=0 ;;
    esac
    if [[ $state != "$last" ]]; then note "$TPU: ${state:-state unknown}; waiting for $want..."; fi
    last=$state
    if ((WAIT_TIMEOUT > 0 && SECONDS - start >= WAIT_TIMEOUT)); then
      die "$TPU not $want after ${WAIT_TIMEOUT}s (state ${state:-unknown}); the request stays queued, rerun create to keep waiting or delete it"
    fi
    sleep "$POLL_SECONDS"
  done
}

# ----------------------------------------------------------------- create ---
capacity_flags() {
  REPLY_FLAGS=()
  if ((SPOT)); then REPLY_FLAGS+=(--spot); fi
  if ((RESERVED)); then REPLY_FLAGS+=(--reserved); fi
  if ((${#CREATE_FLAGS[@]})); then REPLY_FLAGS+=("${CREATE_FLAGS[@]}"); fi
}

qr_create() {
  capacity_flags
  x gcloud compute tpus queued-resources create "$TPU" --node-id="$TPU" "${LOC[@]}" \
    --accelerator-type="$ACCEL" --runtime-version="$VERSION" ${REPLY_FLAGS[@]+"${REPLY_FLAGS[@]}"}
}

node_create() {
  capacity_flags
  x gcloud compute tpus tpu-vm create "$TPU" "${LOC[@]}" \
    --accelerator-type="$ACCEL" --version="$VERSION" ${REPLY_FLAGS[@]+"${REPLY_FLAGS[@]}"}
}

create_queued() {
  local state node
  state=$(qr_state) || state=""
  case $state in
    ACTIVE) note "queued resource $TPU is ACTIVE: reusing it"; return 0 ;;
    ACCEPTED | CREATING | WAITING_FOR_RESOURCES | PROVISIONING)
      note "queued resource $TPU already requested ($state): waiting for it" ;;
    SUSPENDING | SUSPENDED | FAILED)
      note "queued resource $TPU is $state (preempted or failed): deleting it and queueing a new one"
      x gcloud compute tpus queued-resources delete "$TPU" "${LOC[@]}" --force --quiet
      qr_create ;;
    DELETING)
      note "queued resource $TPU is being deleted: waiting, then queueing a new one"
      while [[ -n $(qr_state || true) ]]; do sleep "$POLL_SECONDS"; done
      qr_create ;;
    "")
      node=$(node_state) || node=""
      case $node in
        READY) note "TPU VM $TPU exists (no queued resource) and is READY: reusing it"; return 0 ;;
        "") qr_create ;;
        *) die "TPU VM $TPU exists in state $node without a queued resource; run '$PROG delete' first" ;;
      esac ;;
    *) die "queued resource $TPU is in state $state; wait or run '$PROG delete' first" ;;
  esac
  wait_state qr ACTIVE
}

create_direct() {
  local state
  state=$(node_state) || state=""
  case $state in
    READY) note "TPU VM $TPU is READY: reusing it" ;;
    CREATING | STARTING | RESTARTING | REPAIRING)
      note "TPU VM $TPU is $state: waiting for it"
      wait_state node READY ;;
    PREEMPTED | TERMINATED)
      note "TPU VM $TPU is $state (Spot/preemptible TPUs cannot restart): deleting and recreating it"
      x gcloud compute tpus tpu-vm delete "$TPU" "${LOC[@]}" --quiet
      node_create ;;
    STOPPED) x gcloud compute tpus tpu-vm start "$TPU" "${LOC[@]}" ;;
    "") node_create ;;
    *) die "TPU VM $TPU is in state $state; wait or run '$PROG delete' first" ;;
  esac
}

cmd_create() {
  note "slice $TPU: $ACCEL, runtime $VERSION, $([[ $SPOT == 1 ]] && echo spot || echo on-demand), $([[ $DIRECT == 1 ]] && echo 'tpu-vm create' || echo 'queued resource')"
  if ((DIRECT)); then create_direct; else create_queued; fi
}

# ---------------------------------------------------------------- install ---
# make_tarball SRC OUT: pack the checkout (tracked + untracked-but-not-ignored).
make_tarball() {
  local src=$1 out=$2 a b
  [[ -f $src/pyproject.toml ]] || die "--src $src is not a capjax checkout (no pyproject.toml)"
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    qjoin git -C "$src" ls-files -z --cached --others --exclude-standard
    a=$REPLY
    qjoin tar -C "$src" --null -T - -czf "$out"
    b=$REPLY
    if ((DRY_RUN)); then printf '+ %s | %s\n' "$a" "$b" >&3; return 0; fi
    printf '+ %s | %s\n' "$a" "$b" >&2
    git -C "$src" ls-files -z --cached --others --exclude-standard | tar -C "$src" --null -T - -czf "$out"
  else
    x tar -C "$src" --exclude=.git --exclude=.venv --exclude=__pycache__ -czf "$out" .
  fi
}

TMP_DIR=""
cleanup() { if [[ -n $TMP_DIR ]]; then rm -rf "$TMP_DIR"; fi; }
trap cleanup EXIT

cmd_install() {
  local fetch py venv_py tarball
  if [[ -n $REPO ]]; then
    q "$REPO"
    local url=$REPLY
    q "${REF:-HEAD}"
    fetch="if [ ! -d $R_CODE/.git ]; then rm -rf $R_CODE && git clone -q $url $R_CODE; fi"
    fetch+=" && cd $R_CODE && git remote set-url origin $url && git fetch -q origin $REPLY && git checkout -q --detach FETCH_HEAD"
  else
    if ((DRY_RUN)); then
      tarball=${TMPDIR:-/tmp}/tpu_pod.XXXXXX/$REMOTE_TARBALL
    else
      TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
      tarball=$TMP_DIR/$REMOTE_TARBALL
    fi
    make_tarball "$SRC" "$tarball"
    x gcloud compute tpus tpu-vm scp "$tarball" "$TPU:$REMOTE_TARBALL" "${LOC[@]}" --worker=all ${SSHX[@]+"${SSHX[@]}"}
    fetch="rm -rf $R_CODE && mkdir -p $R_CODE && tar -xzf \"\$HOME\"/$REMOTE_TARBALL -C $R_CODE"
    fetch+=" && rm -f \"\$HOME\"/$REMOTE_TARBALL && cd $R_CODE"
  fi
  if [[ -n $PYTHON ]]; then
    q "$PYTHON"
    py="PY=$REPLY"
  else
    # shellcheck disable=SC2016  # expanded on the workers, not here
    py='PY=; for c in python3.13 python3.12 python3.11 python3; do if command -v "$c" >/dev/null 2>&1 && "$c" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then PY=$c; break; fi; done'
    # shellcheck disable=SC2016
    py+='; if [ -z "$PY" ]; then echo "$(hostname): no python >= 3.11, installing python3.11"; sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11 python3.11-venv >/dev/null && PY=python3.11; fi'
  fi
  venv_py=$R_VENV/bin/python
  local script="set -e; $fetch; $py"
  # shellcheck disable=SC2016
  script+="; [ -x $venv_py ] || \"\$PY\" -m venv $R_VENV"
  script+="; $venv_py -m pip install -q --upgrade pip && $venv_py -m pip install -q -e '.[tpu]'"
  # shellcheck disable=SC2016
  script+="; $venv_py -c 'import capjax, jax; print(\"capjax ready, jax\", jax.__version__)' | sed \"s/^/\$(hostname): /\""
  tpu_ssh all "$script"
}

# -------------------------------------------------------------------- run ---
# Remote shell snippets about the trainer process. PID is the pid recorded by
# `run`, trusted only while /proc/PID/cmdline still names capjax.train.
# shellcheck disable=SC2016  # all of these expand on the workers
trainer_pid_script() {
  printf '%s' "P=$R_PID; " 'pid=$(cat "$P" 2>/dev/null || true); ' \
    'if [ -n "$pid" ] && grep -qa capjax.train /proc/"$pid"/cmdline 2>/dev/null; then alive=1; else alive=0; fi'
}

# stop_script: SIGTERM a running trainer (it checkpoints), wait, then SIGKILL.
# shellcheck disable=SC2016
stop_script() {
  printf '%s' "$(trainer_pid_script); " \
    'if [ "$alive" = 1 ]; then echo "$(hostname): stopping trainer pid $pid (SIGTERM, it saves a checkpoint)"; kill -TERM "$pid";' \
    " for _ in \$(seq $STOP_TIMEOUT); do kill -0 \"\$pid\" 2>/dev/null || break; sleep 1; done;" \
    ' kill -KILL "$pid" 2>/dev/null && echo "$(hostname): trainer killed after the stop timeout" || true; fi'
}

# running_script: print "<hostname> RUNNING|STOPPED".
# shellcheck disable=SC2016
running_script() {
  printf '%s' "$(trainer_pid_script); " 'if [ "$alive" = 1 ]; then s=RUNNING; else s=STOPPED; fi; echo "$(hostname) $s"'
}

cmd_run() {
  local run_id log train env_exports="export CAPJAX_MULTIHOST=1" e script
  if [[ $WORKDIR != gs://* ]]; then
    note "warning: --workdir $WORKDIR is not on GCS; on a multi-host slice every worker needs the same directory and it must outlive the VMs (use gs://...)"
  fi
  run_id=$(date -u +%Y%m%d-%H%M%S)
  log=$R_LOGS/train-$run_id.log
  for e in ${ENVS[@]+"${ENVS[@]}"}; do
    q "$e"
    env_exports+=" $REPLY"
  done
  qjoin --config="$CONFIG" --workdir="$WORKDIR" ${PASS[@]+"${PASS[@]}"}
  local train_args=$REPLY
  train="$R_VENV/bin/python -m capjax.train $train_args"
  # shellcheck disable=SC2016
  script="set -e; if [ ! -x $R_VENV/bin/python ] || [ ! -d $R_CODE ]; then echo \"\$(hostname): capjax is not installed; run '$PROG install' first\"; exit 1; fi"
  script+="; mkdir -p $R_LOGS; $(stop_script); cd $R_CODE; $env_exports"
  script+="; nohup $train > $log 2>&1 < /dev/null &"
  # shellcheck disable=SC2016
  script+=" echo \$! > $R_PID; ln -sfn train-$run_id.log $R_LOG"
  # shellcheck disable=SC2016
  script+="; echo \"\$(hostname): trainer started, pid \$(cat $R_PID), log $log\""
  note "starting on all workers: python -m capjax.train $train_args"
  tpu_ssh all "$script"
  if ((FOLLOW)); then
    note "following worker 0's log until its trainer exits (Ctrl-C stops following; training keeps running)"
    # shellcheck disable=SC2016
    tpu_ssh 0 "if [ -f $R_PID ]; then tail -n +1 -F --pid=\"\$(cat $R_PID)\" $R_LOG; else echo 'no trainer started on worker 0'; fi" ||
      note "lost the connection to worker 0 (training may still be running; check with '$PROG status')"
  else
    note "training started; follow it with: $PROG logs --tpu=$TPU --zone=$ZONE --project=$PROJECT"
  fi
}

# wait_training: block until no worker reports a running trainer.
wait_training() {
  local out fails=0 state
  if ((DRY_RUN)); then
    tpu_ssh_query all "$(running_script)" || true
    note "(repeated every ${POLL_SECONDS}s until no worker reports RUNNING)"
    return 0
  fi
  note "waiting for the trainer to exit on every worker"
  while :; do
    if out=$(tpu_ssh_query all "$(running_script)"); then
      fails=0
      if [[ $out != *RUNNING* ]]; then note "training has ended on every worker"; return 0; fi
    else
      fails=$((fails + 1))
      if ((fails >= 5)); then
        state=$(node_state) || state=""
        if [[ $state != READY ]]; then note "slice $TPU is ${state:-gone}: no trainer left to wait for"; return 0; fi
        fails=0
      fi
    fi
    sleep "$POLL_SECONDS"
  done
}

cmd_stop() {
  tpu_ssh all "$(stop_script)"
}

# ------------------------------------------------------ logs, status, ssh ---
cmd_logs() {
  local tail_cmd="tail -n $LINES"
  if ((FOLLOW)); then tail_cmd+=" -F"; fi
  tail_cmd+=" $R_LOG"
  if [[ $WORKER == all ]]; then
    # shellcheck disable=SC2016
    tail_cmd+=' | sed -u "s/^/[$(hostname)] /"'
  fi
  # shellcheck disable=SC2016
  tpu_ssh "$WORKER" "if [ -e $R_LOG ]; then $tail_cmd; else echo \"\$(hostname): no training log yet ($R_LOG)\"; fi"
}

cmd_status() {
  local state node
  if ((!DIRECT)); then
    state=$(qr_state) || state=""
    if ((!DRY_RUN)); then echo "queued resource $TPU: ${state:-none}"; fi
  fi
  node=$(node_state) || node=""
  if ((!DRY_RUN)); then echo "TPU VM $TPU: ${node:-not found}"; fi
  if [[ -n $node ]]; then
    x gcloud compute tpus tpu-vm describe "$TPU" "${LOC[@]}" \
      --format='table(name.basename(),acceleratorType,runtimeVersion,state,health,schedulingConfig.spot)'
  fi
  if [[ $node == READY ]] || ((DRY_RUN)); then
    # shellcheck disable=SC2016
    tpu_ssh all "$(running_script); tail -n 1 $R_LOG 2>/dev/null | sed \"s/^/\$(hostname)   /\" || true"
  fi
}

cmd_ssh() {
  local args=(gcloud compute tpus tpu-vm ssh "$TPU" "${LOC[@]}" --worker="$WORKER")
  if ((${#SSHX[@]})); then args+=("${SSHX[@]}"); fi
  if ((${#PASS[@]} == 1)); then
    args+=(--command="${PASS[0]}")
  elif ((${#PASS[@]} > 1)); then
    qjoin "${PASS[@]}"
    args+=(--command="$REPLY")
  fi
  x "${args[@]}"
}

# ----------------------------------------------------------------- delete ---
confirm_delete() {
  if ((YES || DRY_RUN)); then return 0; fi
  [[ -t 0 ]] || die "refusing to delete $TPU without confirmation (stdin is not a terminal); pass --yes"
  local answer
  read -r -p "Delete TPU slice $TPU (project $PROJECT, zone $ZONE) and all its workers? [y/N] " answer
  case $answer in
    y | Y | yes | YES) ;;
    *) die "not deleting $TPU" ;;
  esac
}

cmd_delete() {
  local state node
  confirm_delete
  if ((DIRECT)); then
    x gcloud compute tpus tpu-vm delete "$TPU" "${LOC[@]}" --quiet
    return 0
  fi
  state=$(qr_state) || state=""
  if [[ -n $state ]] || ((DRY_RUN)); then
    # --force deletes the queued resource's node(s) first.
    x gcloud compute tpus queued-resources delete "$TPU" "${LOC[@]}" --force --quiet
    return 0
  fi
  node=$(node_state) || node=""
  if [[ -n $node ]]; then
    x gcloud compute tpus tpu-vm delete "$TPU" "${LOC[@]}" --quiet
  else
    note "nothing to delete: neither a queued resource nor a TPU VM named $TPU exists"
  fi
}

cmd_all() {
  cmd_create
  cmd_install
  cmd_run
  if ((DELETE_AFTER)); then
    wait_training
    YES=1
    cmd_delete
  fi
}

"cmd_$COMMAND"
