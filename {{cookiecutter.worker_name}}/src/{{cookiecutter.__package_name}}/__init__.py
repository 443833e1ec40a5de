{{ cookiecutter.description | tojson }}  # the package docstring, from the template answer

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("{{ cookiecutter.worker_name }}")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
