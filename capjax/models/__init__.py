"""Pure Flax modules, no I/O. Each task (`capjax/tasks/`) builds the towers it needs."""
