"""Build of the optional C extension `data._jpeg_crop` (cropped JPEG decode on the system
libjpeg-turbo). Everything else about the package lives in pyproject.toml.

`optional=True`: without libjpeg-turbo headers (Debian: libjpeg62-turbo-dev) the install still
succeeds with a warning and `data.images` falls back to a full decode + slice.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("data._jpeg_crop", ["data/_jpeg_crop.c"], libraries=["jpeg"], optional=True),
    ]
)
