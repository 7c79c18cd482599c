"""Imports every data source module so that each registers itself."""
# pylint: disable=unused-import
from capjax.data import synthetic  # noqa: F401
from capjax.data import coco  # noqa: F401
from capjax.data import flickr8k  # noqa: F401
from capjax.data import shards  # noqa: F401
from capjax.data import imagefolder  # noqa: F401
