"""A small client of the service for ``archopt ... --server URL`` (standard library only).

Each call returns the JSON document the service answered; an error answer becomes ``ServerError``
with the service's one-line message, so the CLI prints it as it prints a local error.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable

from archopt.archdb.errors import ArchoptError


class ServerError(ArchoptError):
    """The service refused a request or could not be reached (one line; ``status`` 0: no answer)."""

    def __init__(self, message: str, status: int = 0, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class Client:
    """Calls the archopt service at ``url`` (``http://host:port``), with a bearer ``token`` for writes."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0) -> None:
        parsed = urllib.parse.urlsplit(url.strip())
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ServerError(f"--server must be an http:// or https:// URL, got {url[:80]!r}")
        self.url = url.strip().rstrip("/")
        self.token = token
        self.timeout = timeout

    def get(self, path: str, **params: Any) -> Any:
        return self._call("GET", path, params)

    def post_json(self, path: str, body: Any) -> Any:
        return self._call("POST", path, {}, json.dumps(body).encode(), "application/json")

    def post_bytes(self, path: str, data: bytes, content_type: str, **params: Any) -> Any:
        return self._call("POST", path, params, data, content_type)

    def query(self, body: dict[str, Any], *, wait_s: float = 600.0,
              on_wait: Callable[[str], None] | None = None) -> Any:
        """``POST /v1/query``; while a first predictor trains (503), waits as Retry-After says."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.post_json("/v1/query", body)
            except ServerError as exc:
                if exc.status != 503 or exc.retry_after is None or time.monotonic() + exc.retry_after > deadline:
                    raise
                if on_wait is not None:
                    on_wait(str(exc))
                time.sleep(exc.retry_after)

    def _call(self, method: str, path: str, params: dict[str, Any], data: bytes | None = None,
              content_type: str | None = None) -> Any:
        query = urllib.parse.urlencode({k: _text(v) for k, v in params.items() if v is not None})
        url = self.url + urllib.parse.quote(path) + (f"?{query}" if query else "")
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise _server_error(exc) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (BrokenPipeError, ConnectionResetError)) and data:
                raise ServerError(f"the service at {self.url} closed the connection during the upload "
                                  "(is the file larger than its --max-body?)") from None
            raise ServerError(f"cannot reach the archopt service at {self.url}: {reason}") from None
        except (BrokenPipeError, ConnectionResetError):
            raise ServerError(f"the service at {self.url} closed the connection"
                              + (" during the upload (is the file larger than its --max-body?)" if data else "")) from None
        except (TimeoutError, OSError) as exc:
            raise ServerError(f"no answer from the archopt service at {self.url}: {exc}") from None
        except ValueError:
            raise ServerError(f"the service at {self.url} answered something that is not JSON") from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _server_error(exc: urllib.error.HTTPError) -> ServerError:
    try:
        message = json.loads(exc.read()).get("error")
    except (ValueError, AttributeError, OSError):
        message = None
    retry = exc.headers.get("Retry-After") if exc.headers else None
    try:
        retry_after = float(retry) if retry is not None else None
    except ValueError:
        retry_after = None
    return ServerError(str(message) if message else f"the service answered HTTP {exc.code} {exc.reason}",
                       exc.code, retry_after)
