"""The package version, in one place: read by ``bucketmoo_kernels.__version__`` and by the build
(``pyproject.toml``: ``[tool.setuptools.dynamic] version``). A plain assignment, so the build
reads it without importing the package (and torch)."""

__version__ = "0.1.0"
