"""The one compiled piece: the C-STORE data phase (gateway/_pdata.c), loaded with ctypes.

Optional: without a C compiler the build goes on and the gateway uses its Python lane.
Everything else about the distribution is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gateway._pdata", ["gateway/_pdata.c"], optional=True)])
