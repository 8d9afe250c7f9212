"""``encrypted:<token>`` references in configuration files, carried over to a new master key.

``meltica keys rotate-master`` re-encrypts the credential store *and* the tokens written in configuration
files; without the second part a settings file holding ``api_secret: encrypted:…`` under the old key would
stop decrypting the moment the master key is replaced.

Only the tokens change: every other byte of a file (comments, quoting, order, line endings) stays as it was.
A token is found as a YAML scalar whose value starts with ``encrypted:`` (mentions in comments are not
tokens), so the field it belongs to can be named. Each token is classified:

* decrypts with the old key → re-encrypted under the new key;
* decrypts with the new key already → left as it is (a rerun, or a token added after the new key);
* decrypts with neither → a problem, reported by file, line and field, never by value.

Files are rewritten in two steps: :meth:`ConfigRotationPlan.stage` writes each new file next to the old one,
:meth:`StagedConfigFiles.publish` renames them into place (an atomic replace per file), so a failure before
publication (the database rotation, say) leaves every file untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from meltica.errors import ConfigurationError, SecretError
from meltica.secrets.master_key import MasterKey
from meltica.secrets.redaction import register_secret
from meltica.secrets.references import ENCRYPTED_PREFIX

CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class TokenSite:
    """Where an ``encrypted:`` token sits: file, 1-based line and column, and the dotted field path."""

    path: Path
    line: int
    column: int
    field: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}"


@dataclass
class ConfigFileRotation:
    """One configuration file: its text before and after, and what happened to each token in it."""

    path: Path
    original: str
    rewritten: str
    reencrypted: list[TokenSite] = field(default_factory=list)
    already_new: list[TokenSite] = field(default_factory=list)
    undecryptable: list[TokenSite] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.rewritten != self.original


@dataclass
class ConfigRotationPlan:
    """The outcome of re-encrypting the tokens of some configuration files, computed without writing."""

    files: list[ConfigFileRotation]

    @property
    def reencrypted(self) -> list[TokenSite]:
        return [site for item in self.files for site in item.reencrypted]

    @property
    def already_new(self) -> list[TokenSite]:
        return [site for item in self.files for site in item.already_new]

    @property
    def undecryptable(self) -> list[TokenSite]:
        return [site for item in self.files for site in item.undecryptable]

    @property
    def changed_files(self) -> list[ConfigFileRotation]:
        return [item for item in self.files if item.changed]

    def stage(self) -> StagedConfigFiles:
        """Write every changed file's new text to a temporary file beside it (same mode); nothing is replaced
        yet. Refused while any token is undecryptable."""
        if self.undecryptable:
            raise SecretError(
                f"{len(self.undecryptable)} encrypted token(s) cannot be decrypted; no file is rewritten",
                reason="secret_undecryptable",
            )
        staged = StagedConfigFiles()
        try:
            for item in self.changed_files:
                try:
                    staged.add(item.path, item.rewritten)
                except OSError as exc:
                    raise ConfigurationError(
                        f"{item.path}: cannot write the re-encrypted file beside it: {exc.strerror or exc}; "
                        "nothing was changed",
                        source=str(item.path),
                    ) from None
        except BaseException:
            staged.discard()
            raise
        return staged


@dataclass
class StagedConfigFiles:
    """New file contents written beside their targets, waiting to be renamed into place."""

    pending: list[tuple[Path, Path]] = field(default_factory=list)

    def add(self, target: Path, text: str) -> None:
        info = target.stat()
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".rotating")
        temporary = Path(name)
        self.pending.append((temporary, target))
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, info.st_mode & 0o7777)
        if hasattr(os, "chown") and (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
            # Only root can give the file back to its owner; anyone else keeps the file as theirs.
            with contextlib.suppress(PermissionError):
                os.chown(temporary, info.st_uid, info.st_gid)

    def publish(self) -> list[Path]:
        """Replace each target by its new content (atomic per file); returns the files replaced. A rename
        that fails (rare: the staged file sits in the same directory) is reported with where the new content
        waits, since the keys have already moved on."""
        done: list[Path] = []
        while self.pending:
            temporary, target = self.pending[0]
            try:
                os.replace(temporary, target)
            except OSError as exc:
                waiting = ", ".join(f"{t} -> {p}" for t, p in self.pending)
                raise SecretError(
                    f"{target}: cannot replace the file: {exc.strerror or exc}; rename by hand: {waiting}",
                    reason="config_rewrite_failed",
                ) from None
            self.pending.pop(0)
            done.append(target)
        return done

    def discard(self) -> None:
        for temporary, _ in self.pending:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
        self.pending = []


def config_files(paths: Iterable[Path]) -> list[Path]:
    """The configuration files named by ``paths``: files as given, directories searched recursively for
    ``*.yaml``/``*.yml``; symlinks resolved (the target is what gets rewritten), each file once."""
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.suffix in CONFIG_SUFFIXES and p.is_file())
        elif path.is_file():
            candidates = [path]
        else:
            raise ConfigurationError(f"{path}: no such configuration file or directory", source=str(path))
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved not in seen:
                seen.add(resolved)
                found.append(resolved)
    return found


def plan_config_rotation(paths: Sequence[Path], old_key: MasterKey, new_key: MasterKey) -> ConfigRotationPlan:
    """Classify and re-encrypt (in memory) every ``encrypted:`` token of the files ``paths``."""
    return ConfigRotationPlan([_rotate_file(path, old_key, new_key) for path in paths])


def _rotate_file(path: Path, old_key: MasterKey, new_key: MasterKey) -> ConfigFileRotation:
    try:
        # Bytes decoded as they are: "\r\n" and a BOM survive the rewrite.
        original = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read configuration file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path}: not UTF-8 text", source=str(path)) from None
    result = ConfigFileRotation(path=path, original=original, rewritten=original)
    edits: list[tuple[int, int, str]] = []
    for node, location in _token_nodes(path, original):
        site = TokenSite(path, node.start_mark.line + 1, node.start_mark.column + 1, _dotted(location))
        value: str = node.value
        plain = _try_decrypt(old_key, value[len(ENCRYPTED_PREFIX) :])
        if plain is None:
            if _try_decrypt(new_key, value[len(ENCRYPTED_PREFIX) :]) is not None:
                result.already_new.append(site)
            else:
                result.undecryptable.append(site)
            continue
        register_secret(plain)
        start, end = node.start_mark.index, node.end_mark.index
        source = original[start:end]
        if source.count(value) != 1:
            # A token folded over several lines (or escaped) has no single span to replace.
            raise ConfigurationError(
                f"{site}: the encrypted token is not written on one line; put it on one line and run again",
                source=str(path),
                line=site.line,
            )
        replacement = ENCRYPTED_PREFIX + new_key.encrypt(plain).decode("ascii")
        edits.append((start, end, source.replace(value, replacement)))
        result.reencrypted.append(site)
    text = original
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    result.rewritten = text
    return result


def _try_decrypt(key: MasterKey, token: str) -> str | None:
    try:
        return key.decrypt(token)
    except SecretError:
        return None


def _token_nodes(path: Path, text: str) -> Iterator[tuple[yaml.ScalarNode, tuple[str | int, ...]]]:
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(unknown position)"
        raise ConfigurationError(
            f"{path}: {where}: YAML syntax error: {exc.problem or exc.context or 'invalid YAML'}", source=str(path)
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: YAML syntax error: {exc}", source=str(path)) from None
    seen: set[int] = set()
    for document in documents:
        if document is not None:
            yield from _walk(document, (), seen)


def _walk(
    node: yaml.Node, location: tuple[str | int, ...], seen: set[int]
) -> Iterator[tuple[yaml.ScalarNode, tuple[str | int, ...]]]:
    if id(node) in seen:  # an alias: the anchored node was (or is being) visited already
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            yield from _walk(value, (*location, str(name)), seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from _walk(item, (*location, index), seen)
    elif (
        isinstance(node, yaml.ScalarNode)
        and isinstance(node.value, str)
        and node.value.startswith(ENCRYPTED_PREFIX)
        and len(node.value) > len(ENCRYPTED_PREFIX)
    ):
        yield node, location


def _dotted(location: Sequence[str | int]) -> str:
    out = ""
    for part in location:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + part
    return out or "(top level)"
