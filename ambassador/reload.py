"""The ambassador's config in force, and its hot reload.

:class:`ConfigHolder` holds the settings and re-reads the file when it changes — checked by
a watch thread every second (an idle sidecar takes an edit within about two seconds) and at
most once a second by traffic. An invalid file, or one the running sidecar refuses (auth
turned off on a public address), is logged and counted, and the last good config stays in
force. Applying a new config (``on_change``) is the app's: it builds a new pipeline that
keeps what the sidecar learned (ambassador/pipeline.py, ambassador/parts.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from ambassador.config import ConfigError, Settings, load

log = logging.getLogger("ambassador.config")


# Set (to 1) by ``flowgate ambassador`` when it listens on a non-loopback address without
# --force; a reload may then not turn inbound auth off either.
REFUSE_NO_AUTH_ENV = "AMBASSADOR_REFUSE_NO_AUTH"


def refuse_no_auth(settings: Settings) -> str | None:
    if settings.inbound_auth.mode == "none":
        return ("inbound_auth.mode: none is refused: the ambassador listens on a non-loopback "
                "address (restart it with --force to allow this)")
    return None


class ConfigHolder:
    """The config in force, re-read when its file changes (checked at most every
    ``check_every_s``). An invalid new file is logged and ignored: the last good config
    stays. ``check`` may refuse a valid file too (its reason, or None to accept): the
    ambassador bound to a non-loopback address refuses a reload to ``inbound_auth: none``
    as it refused to start with it. ``on_change`` rebuilds whatever depends on the config
    (the filter chain); a ConfigError it raises (an unreadable key file) refuses the new
    config like an invalid one."""

    def __init__(self, settings: Settings, path: str | None, *, check_every_s: float = 1.0,
                 overrides: Mapping[str, Any] | None = None,
                 on_change: Callable[[Settings], None] | None = None,
                 on_reload_error: Callable[[str], None] | None = None,
                 check: Callable[[Settings], str | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._check = check
        self.path = path
        self.overrides = dict(overrides or {})
        self._every = check_every_s
        self._clock = clock
        self._next_check = clock() + check_every_s
        self._mtime = self._stat()
        self._on_change = on_change
        self._on_error = on_reload_error
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def watch(self) -> None:
        """Check the file every ``check_every_s`` from a background thread (a greenlet
        under gevent) too, so an idle sidecar takes an edit within about two seconds, not
        on its next request. The thread holds the holder weakly: it ends with it."""
        if self.path is None:
            return
        holder_ref, every = weakref.ref(self), self._every

        def loop() -> None:
            while True:
                time.sleep(every)
                holder = holder_ref()
                if holder is None:
                    return
                try:
                    holder.maybe_reload(due=True)
                except Exception:  # never the end of the watch
                    log.exception("config reload check failed")
                del holder

        threading.Thread(target=loop, daemon=True, name="ambassador-config-watch").start()

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime if self.path else None
        except OSError:
            return None

    def maybe_reload(self, *, due: bool = False) -> bool:
        """Cheap when nothing changed: one clock read per request, one stat per interval
        (``due``: the watch's call, stat now)."""
        if self.path is None or (not due and self._clock() < self._next_check):
            return False
        with self._lock:
            self._next_check = self._clock() + self._every
            mtime = self._stat()
            if mtime is None or mtime == self._mtime:
                return False
            self._mtime = mtime
            try:
                fresh = load(self.path, overrides=self.overrides)
                refused = self._check(fresh) if self._check else None
                if refused:
                    raise ConfigError(refused)
                if self._on_change:  # may refuse it too: e.g. an unreadable JWKS file
                    self._on_change(fresh)
            except Exception as exc:
                # ConfigError says what is wrong; anything else (a malformed redis_url, an
                # unreadable key file met while building) is refused the same way: the last
                # good config (its keys, its revocations) stays, and the failure shows
                message = str(exc) if isinstance(exc, ConfigError) else (
                    f"the new config could not be put in force: {type(exc).__name__}: "
                    f"{str(exc)[:200]}")
                self.last_error = message
                log.error("config reload failed; keeping the last good config",
                          extra={"error": message})
                if self._on_error:
                    self._on_error(message)
                return False
            self.settings, self.last_error = fresh, None
            log.info("config reloaded", extra={"path": self.path})
            return True
