"""Flow definitions as pure code: model, validation, templates and compilation.

Nothing in this package imports Flask, SQLAlchemy or a network client; everything here can
be tested with plain dicts.
"""
