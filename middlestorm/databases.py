"""Turning database URIs into Storm databases, and keeping passwords out of sight."""

from __future__ import annotations

import importlib.util
import re
from typing import TypeAlias

from storm.database import Database, _database_schemes, create_database
from storm.exceptions import DatabaseModuleError, URIError
from storm.uri import URI

from middlestorm.errors import ConfigurationError

__all__ = ["DatabaseSpec", "open_database", "redact_uri"]

#: What may name a database: a Storm ``Database`` or a URI string.
DatabaseSpec: TypeAlias = "Database | str"

_USERINFO_PASSWORD = re.compile(r"(//[^/:@]*:)[^/]*@")
_OPTION_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)
_BUILTIN_SCHEMES = ("sqlite", "postgres", "mysql")
_DRIVER_EXTRAS = {"postgres": "postgres", "mysql": "mysql"}


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password, if any, replaced by ``***``.

    >>> redact_uri("postgres://app:s3cret@db.example/app")
    'postgres://app:***@db.example/app'
    """
    uri = _USERINFO_PASSWORD.sub(r"\1***@", uri)
    return _OPTION_PASSWORD.sub(r"\1***", uri)


def known_schemes() -> list[str]:
    """The URI schemes Storm can open here."""
    return sorted(set(_BUILTIN_SCHEMES) | set(_database_schemes))


def open_database(spec: DatabaseSpec) -> tuple[Database, str]:
    """Return the Storm database ``spec`` names and a printable (redacted) name.

    Nothing is connected yet; only the URI's form and scheme are checked,
    so a malformed URI fails here instead of in the first request.

    :raises ConfigurationError: for a malformed URI, an unknown scheme or a
        missing database driver.
    :raises TypeError: when ``spec`` is neither a ``Database`` nor a string.
    """
    if isinstance(spec, Database):
        uri = spec.get_uri()
        return spec, redact_uri(str(uri)) if uri is not None else repr(type(spec).__name__)
    if not isinstance(spec, str):
        raise TypeError(
            "a database must be a storm.database.Database or a URI string such as "
            f"'sqlite:app.db' or 'postgres://user@host/db', not {type(spec).__name__}"
        )
    shown = redact_uri(spec)
    try:
        uri = URI(spec)
    except (URIError, ValueError):
        raise ConfigurationError(
            f"malformed database URI {shown!r}: expected 'scheme:database' or "
            "'scheme://user:password@host:port/database?option=value' "
            "(for example 'sqlite:app.db' or 'postgres://app@localhost/app')"
        ) from None
    if uri.scheme not in _database_schemes and (
        not uri.scheme.isidentifier()
        or importlib.util.find_spec(f"storm.databases.{uri.scheme}") is None
    ):
        raise ConfigurationError(
            f"unknown database scheme {uri.scheme!r} in {shown!r}: "
            f"use one of {', '.join(known_schemes())}"
        )
    try:
        return create_database(uri), shown
    except DatabaseModuleError:
        extra = _DRIVER_EXTRAS.get(uri.scheme, uri.scheme)
        raise ConfigurationError(
            f"the driver for {uri.scheme!r} databases is not installed ({shown!r}): "
            f"pip install 'middlestorm[{extra}]'"
        ) from None
    except (URIError, ValueError) as error:
        message = redact_uri(str(error)).replace(spec, shown)
        if uri.password:
            message = message.replace(uri.password, "***")
        raise ConfigurationError(f"bad database URI {shown!r}: {message}") from None
