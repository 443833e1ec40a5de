{{ cookiecutter.description | tojson }}  # the package docstring, from the template answer


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata on first use: importing
    importlib.metadata costs more than the rest of ``--help``."""
    if name != "__version__":
        raise AttributeError(name)
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("{{ cookiecutter.worker_name }}")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0"
    globals()["__version__"] = found
    return found
