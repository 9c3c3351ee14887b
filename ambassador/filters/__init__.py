"""One module per concern; each holds one filter class with ``__call__(request, next)``."""
