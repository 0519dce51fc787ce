"""Turning database URIs into Storm databases, and keeping passwords out of sight."""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import TypeAlias
from urllib.parse import unquote

from storm.database import Database, _database_schemes, create_database
from storm.exceptions import DatabaseModuleError, URIError
from storm.uri import URI

from middlestorm.errors import ConfigurationError

__all__ = ["SCHEME_ALIASES", "DatabaseSpec", "open_database", "redact_uri"]

#: What may name a database: a Storm ``Database`` or a URI string.
DatabaseSpec: TypeAlias = "Database | str"

#: ``//user:`` up to the last ``@``: a password may hold any character, so
#: everything up to the last ``@`` is taken for it. A URI with a raw ``@``
#: after its host (an ``application_name=a@b`` option, say) shows less than
#: it could, never more.
_USERINFO_PASSWORD = re.compile(r"(//[^@:]*:).*@", re.DOTALL)
#: One ``key=value`` option and any ``&piece`` without ``=`` after it (which
#: cannot be an option, so belongs to the value).
_OPTION = re.compile(r"([?&])([^&=]*)=([^&]*(?:&[^&=]*(?=&|\Z))*)", re.DOTALL)
_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HIGH_ESCAPES = re.compile(r"(?:%[89A-Fa-f][0-9A-Fa-f])+")
_BUILTIN_SCHEMES = ("sqlite", "postgres", "mysql")
#: The PyPI package of the driver Storm needs for a scheme.
_DRIVER_PACKAGES = {"postgres": "psycopg2-binary", "mysql": "mysqlclient"}
#: Other names of a scheme, as other tools (SQLAlchemy, libpq, Django) spell it.
SCHEME_ALIASES = {"postgresql": "postgres"}
_PERCENT_ENCODE = (
    "percent-encode those characters: '@' is %40, ':' %3A, '/' %2F, '?' %3F, "
    "'#' %23, '%' %25 (write non-ASCII characters as they are)"
)
#: What libpq takes for whitespace when it splits ``key=value`` settings.
_LIBPQ_WHITESPACE = frozenset(" \t\n\v\f\r")
_LIBPQ_LABELS = {
    "dbname": "the database name",
    "host": "the host",
    "user": "the user name",
    "password": "the password",
}
_LIBPQ_VARIABLES = {
    "dbname": "PGDATABASE",
    "host": "PGHOST",
    "user": "PGUSER",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
}


def redact_uri(uri: str) -> str:
    """Return ``uri`` with its password, if any, replaced by ``***``.

    A password is hidden whatever its characters, raw or percent-encoded,
    whether in the user part or in a ``password=`` option.

    >>> redact_uri("postgres://app:s3cret@db.example/app")
    'postgres://app:***@db.example/app'
    """
    uri = _USERINFO_PASSWORD.sub(r"\1***@", uri, count=1)
    return _OPTION.sub(_redact_option, uri)


def _redact_option(match: re.Match[str]) -> str:
    separator, key, _ = match.groups()
    if unquote(key, encoding="latin-1").lower() == "password":
        return f"{separator}{key}=***"
    return match.group(0)


def known_schemes() -> list[str]:
    """The URI schemes Storm can open here."""
    return sorted(set(_BUILTIN_SCHEMES) | set(_database_schemes))


def open_database(spec: DatabaseSpec) -> tuple[Database, str]:
    """Return the Storm database ``spec`` names and a printable (redacted) name.

    Nothing is connected yet; only the URI's form and scheme are checked,
    and that the driver will read it as written, so a URI that would fail
    or be misread fails here instead of in the first request.

    :raises ConfigurationError: for a malformed URI, one Storm or libpq would
        misread, an unknown scheme or a missing database driver.
    :raises TypeError: when ``spec`` is neither a ``Database`` nor a string.
    """
    if isinstance(spec, Database):
        uri = spec.get_uri()
        shown = redact_uri(str(uri)) if uri is not None else repr(type(spec).__name__)
        _check_libpq(spec, shown)
        return spec, shown
    if not isinstance(spec, str):
        raise TypeError(
            "a database must be a storm.database.Database or a URI string such as "
            f"'sqlite:app.db' or 'postgres://user@host/db', not {type(spec).__name__}"
        )
    shown = redact_uri(spec)
    misread = _storm_misreading(spec)
    if misread is not None:
        raise ConfigurationError(f"Storm would misread the database URI {shown!r}: {misread}")
    try:
        uri = URI(spec)
    except (URIError, ValueError):
        raise ConfigurationError(
            f"malformed database URI {shown!r}: expected 'scheme:database' or "
            "'scheme://user:password@host:port/database?option=value' "
            "(for example 'sqlite:app.db' or 'postgres://app@localhost/app'); "
            f"if a user name or password holds '@', ':', '/', '?' or '%', {_PERCENT_ENCODE}"
        ) from None
    uri.scheme = SCHEME_ALIASES.get(uri.scheme, uri.scheme)
    if uri.scheme not in _database_schemes and (
        not uri.scheme.isidentifier()
        or importlib.util.find_spec(f"storm.databases.{uri.scheme}") is None
    ):
        raise ConfigurationError(
            f"unknown database scheme {uri.scheme!r} in {shown!r}: "
            f"use one of {', '.join(known_schemes())}{_scheme_hint(uri.scheme, shown)}"
        )
    try:
        database = create_database(uri)
    except DatabaseModuleError:
        package = _DRIVER_PACKAGES.get(uri.scheme)
        install = (
            f"pip install {package}"
            if package
            else f"install the module storm.databases.{uri.scheme} imports"
        )
        raise ConfigurationError(
            f"the driver for {uri.scheme!r} databases is not installed ({shown!r}): {install}"
        ) from None
    except (URIError, ValueError) as error:
        message = redact_uri(str(error)).replace(spec, shown)
        if uri.password:
            message = message.replace(uri.password, "***")
        raise ConfigurationError(f"bad database URI {shown!r}: {message}") from None
    _check_libpq(database, shown)
    return database, shown


def _scheme_hint(scheme: str, shown: str) -> str:
    """How to write a URI whose scheme names a driver too, as SQLAlchemy's do."""
    base = scheme.partition("+")[0]
    base = SCHEME_ALIASES.get(base, base)
    if base != scheme and base in _BUILTIN_SCHEMES:
        return f"; Storm's URIs name no driver: write {shown.replace(scheme, base, 1)!r}"
    return ""


def _storm_misreading(spec: str) -> str | None:
    """What Storm's URI parser would read otherwise than written in ``spec``, if anything.

    Storm cuts a URI at its first ``?``, then at the first ``/`` and ``@`` and
    the last ``:`` of what precedes, and decodes ``%XX`` one byte per character.
    """
    if _STRAY_PERCENT.search(spec):
        return "a '%' that starts no %XX escape: percent-encode a '%' itself as %25"
    for escapes in _HIGH_ESCAPES.findall(spec):
        try:
            bytes.fromhex(escapes.replace("%", "")).decode("utf-8")
        except UnicodeDecodeError:
            continue
        return (
            "it percent-encodes UTF-8 (such as %C3%A4 for 'ä'), which Storm decodes "
            "one byte per character: write non-ASCII characters as they are"
        )
    rest = spec.partition(":")[2]
    if not rest.startswith("//"):
        return None
    authority, _, path = rest[2:].partition("?")[0].partition("/")
    userinfo = authority.rpartition("@")[0]
    if authority.count("@") > 1 or userinfo.count(":") > 1 or "@" in path or "#" in userinfo:
        return (
            "its user name or password holds '@', ':', '/' or '#', which Storm takes for the "
            f"end of it; {_PERCENT_ENCODE} (a '@' in the database name is %40 too)"
        )
    return None


def _check_libpq(database: Database, shown: str) -> None:
    """Refuse a PostgreSQL database whose settings libpq would misread.

    Storm pastes each setting unquoted into a libpq ``key=value`` string,
    where whitespace ends a value, a backslash escapes the next character,
    a leading quote starts a quoted value, NUL ends the string and an empty
    value takes the next setting for its own. libpq's own parser decides.

    :raises ConfigurationError: naming the setting and what to do instead,
        never showing the password.
    """
    postgres = sys.modules.get("storm.databases.postgres")
    if postgres is None or not isinstance(database, postgres.Postgres):
        return
    uri = database.get_uri()
    settings = [("dbname", str(uri.database))]  # Storm writes "dbname=None" without one
    if uri.host is not None:
        settings.append(("host", uri.host))
    if uri.port is not None:
        settings.append(("port", str(uri.port)))
    if uri.username is not None:
        settings.append(("user", uri.username))
    if uri.password is not None:
        settings.append(("password", uri.password))
    settings.extend(uri.options.items())
    if _libpq_reads(postgres.make_dsn(uri)) == dict(settings):
        return
    visible = {unquote(p.partition("=")[0]) for p in shown.partition("?")[2].split("&")}
    for key, _ in uri.options.items():
        if _libpq_reads(f"{key}=x") is None:
            named = repr(key) if key in visible else "named in its options"
            raise ConfigurationError(
                f"PostgreSQL has no connection option {named} (database URI {shown!r}); see "
                "https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS"
            )
    for index, (key, value) in enumerate(settings):
        # This setting as written, the others replaced by a plain "x".
        alone = [(k, value if i == index else "x") for i, (k, _) in enumerate(settings)]
        if _libpq_reads(" ".join(f"{k}={v}" for k, v in alone)) == dict(alone):
            continue
        label = _LIBPQ_LABELS.get(key, f"the option {key!r}")
        raise ConfigurationError(
            f"{label} in the database URI {shown!r} {_libpq_trouble(value)}: Storm passes "
            f"it to libpq unquoted, and libpq would misread it; {_libpq_fix(key, value)}"
        )
    raise ConfigurationError(f"libpq cannot read the settings of the database URI {shown!r}")


def _libpq_reads(dsn: str) -> dict[str, str] | None:
    """The settings libpq reads in ``dsn``, or ``None`` when it refuses it."""
    import psycopg2
    from psycopg2.extensions import parse_dsn

    try:
        return dict(parse_dsn(dsn))
    except (psycopg2.Error, ValueError):
        return None


def _libpq_trouble(value: str) -> str:
    if not value:
        return "is empty, so libpq would take the next setting for it"
    found = []
    if _LIBPQ_WHITESPACE.intersection(value):
        found.append("whitespace")
    if value.startswith("'"):
        found.append("a quote (') first")
    if "\\" in value:
        found.append("a backslash")
    if "\0" in value:
        found.append("a NUL character")
    return f"holds {' and '.join(found) or 'characters libpq cannot read'}"


def _libpq_fix(key: str, value: str) -> str:
    if not value:
        return "leave it out of the URI"
    if key == "password":
        return (
            "use a password without such characters, or leave it out of the URI and let "
            "libpq read it from the PGPASSWORD environment variable or a ~/.pgpass file"
        )
    variable = _LIBPQ_VARIABLES.get(key, "matching PG*")
    return (
        f"leave it out of the URI and set it in the {variable} environment variable, "
        "which libpq reads (https://www.postgresql.org/docs/current/libpq-envars.html)"
    )
