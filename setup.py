"""Build the one compiled part: mae_jpeg_region, which decodes only the rows and columns
of a RandomResizedCrop (libjpeg-turbo's jpeg_skip_scanlines / jpeg_crop_scanline). It is
optional: without a C compiler or libjpeg's headers (Debian: libjpeg62-turbo-dev) the
install goes on and the stream decodes whole images, which is slower (README: Benchmarks).

A top-level module, not one inside `mae`: `ray job submit --working-dir .` ships the source
tree without build outputs (.gitignore), and its `mae` package shadows the installed one;
a module outside it is still found where the package was installed."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("mae_jpeg_region", ["csrc/jpeg_region.c"], libraries=["jpeg"], optional=True)])
