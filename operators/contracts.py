"""Event contracts: what a raw event of a given `(schema_urn, version)` must look like.

Each contract lives in `operators/contracts/` as one JSON file named after its key
(`urn:nc:events:web` v1 → `urn_nc_events_web.v1.json`)::

    {
      "schema_urn": "urn:nc:events:web",
      "version": 1,
      "title": "...", "description": "...",
      "fields": [
        {"name": "event_id", "type": "string", "required": true, "description": "..."},
        {"name": "error", "type": "object", "fields": [
            {"name": "message", "type": "string"}, {"name": "stack", "type": "string"}]},
        ...
      ]
    }

Field types: `string`, `integer` (JSON integer, never a boolean), `number` (integer or float), `boolean`,
`object`, `array` and `timestamp` (ISO-8601 text with `Z` or a UTC offset, or epoch milliseconds as an
integer). An `object` may declare its members in `fields`; those are checked too and flattened into
`<object>_<member>` columns. Fields the contract does not declare are ignored.

Contracts are immutable once registered: `digests.sha256` (in `sha256sum` format) pins the sha256 of
every contract file and loading refuses a file whose bytes no longer match, a file the manifest does
not list, and a listed file that is gone. A change is a new version: add
`urn_..._vN+1.json`, then `python -m operators.contracts register` appends its digest (it never rewrites
an existing line). `python -m operators.contracts check` verifies the directory.

How the validated fields become columns of `EVENT_SCHEMA`: a field whose name (or flattened
`<object>_<member>` name) is a column fills that column; objects without declared members and arrays
become compact JSON text; timestamps become UTC milliseconds. Loading checks that every such pairing has
a compatible column type and that the contract declares the fields the pipeline relies on
(`schema_urn`, `version`, `event_id`, `timestamp`).
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import orjson
import polars as pl

from operators.model import EVENT_SCHEMA

CONTRACTS_DIR = Path(__file__).resolve().parent / "contracts"
MANIFEST_NAME = "digests.sha256"

FIELD_TYPES = frozenset({"string", "integer", "number", "boolean", "object", "array", "timestamp"})

_URN_RE = re.compile(r"^urn:[a-z0-9][a-z0-9-]*(:[A-Za-z0-9._-]+)+$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DIGEST_LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](\S+)$")
_CONTRACT_KEYS = frozenset({"schema_urn", "version", "title", "description", "fields"})
_FIELD_KEYS = frozenset({"name", "type", "required", "description", "fields"})

# Fields every contract must declare, because the pipeline after validation relies on them.
_ENVELOPE = {"schema_urn": "string", "version": "integer", "event_id": "string", "timestamp": "timestamp"}
# Columns the pipeline fills itself (from the RawRecord), never from a field of the event.
_RESERVED_COLUMNS = frozenset({"ingested_at", "source"})


class ContractError(Exception):
    """A contract file or the contract directory is not acceptable."""


class ContractDigestError(ContractError):
    """A contract file does not match the digest manifest (changed, unregistered or removed)."""


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    type: str
    required: bool = False
    description: str = ""
    # Declared members of an `object` field (None: a free-form object).
    fields: tuple[FieldSpec, ...] | None = None


@dataclass(frozen=True, slots=True)
class Contract:
    schema_urn: str
    version: int
    fields: tuple[FieldSpec, ...]
    title: str = ""
    description: str = ""
    digest: str = ""  # sha256 of the file as stored

    @property
    def file_name(self) -> str:
        return contract_file_name(self.schema_urn, self.version)

    def columns(self) -> dict[str, tuple[tuple[str, ...], FieldSpec]]:
        """`EVENT_SCHEMA` column → (path of the field in the event, its spec) for the fields that fill
        a column."""
        out: dict[str, tuple[tuple[str, ...], FieldSpec]] = {}

        def walk(specs: tuple[FieldSpec, ...], path: tuple[str, ...]) -> None:
            for spec in specs:
                here = (*path, spec.name)
                if spec.type == "object" and spec.fields is not None:
                    walk(spec.fields, here)
                    continue
                column = "_".join(here)
                if column in EVENT_SCHEMA:
                    out[column] = (here, spec)

        walk(self.fields, ())
        return out


def contract_file_name(schema_urn: str, version: int) -> str:
    return f"{schema_urn.replace(':', '_')}.v{version}.json"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compute_digests(directory: Path = CONTRACTS_DIR) -> dict[str, str]:
    """File name → sha256 of every contract file (`*.json`) in `directory`."""
    return {p.name: sha256_file(p) for p in sorted(Path(directory).glob("*.json"))}


def read_manifest(path: Path) -> dict[str, str]:
    """The digest manifest as file name → sha256 (`sha256sum` format, `#` comments allowed)."""
    out: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _DIGEST_LINE_RE.match(line)
        if match is None:
            raise ContractDigestError(f"{path}:{number}: not a '<sha256>  <file>' line: {raw!r}")
        digest, name = match.groups()
        if name in out:
            raise ContractDigestError(f"{path}:{number}: {name} is listed twice")
        out[name] = digest
    return out


def _type_name(value: object) -> str:
    return type(value).__name__


def _parse_fields(raw: object, where: str, *, nested: bool) -> tuple[FieldSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ContractError(f"{where}: 'fields' must be a non-empty list")
    specs: list[FieldSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        at = f"{where}: fields[{index}]"
        if not isinstance(item, dict):
            raise ContractError(f"{at} must be an object, got {_type_name(item)}")
        unknown = sorted(set(item) - _FIELD_KEYS)
        if unknown:
            raise ContractError(f"{at}: unknown keys {unknown}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ContractError(f"{at}: 'name' must be an identifier, got {name!r}")
        at = f"{where}: field '{name}'"
        if name in seen:
            raise ContractError(f"{at} is declared twice")
        seen.add(name)
        ftype = item.get("type")
        if ftype not in FIELD_TYPES:
            raise ContractError(f"{at}: 'type' must be one of {sorted(FIELD_TYPES)}, got {ftype!r}")
        required = item.get("required", False)
        if not isinstance(required, bool):
            raise ContractError(f"{at}: 'required' must be true or false")
        description = item.get("description", "")
        if not isinstance(description, str):
            raise ContractError(f"{at}: 'description' must be a string")
        members = None
        if "fields" in item:
            if ftype != "object":
                raise ContractError(f"{at}: only an object field may declare 'fields'")
            if nested:
                raise ContractError(f"{at}: members of an object may not declare 'fields' themselves")
            members = _parse_fields(item["fields"], f"{where}: field '{name}'", nested=True)
        specs.append(FieldSpec(name, ftype, required, description, members))
    return tuple(specs)


# Which field types may fill a column of which polars type.
def _compatible(spec: FieldSpec, dtype: pl.DataType, column: str) -> bool:
    if spec.type in ("string", "object", "array"):  # objects/arrays travel as JSON text
        return dtype == pl.String()
    if spec.type == "timestamp":
        return dtype == pl.Datetime("ms", "UTC")
    if spec.type == "integer":
        # Int32 only for `version`, whose values are bounded by the registry.
        return dtype == pl.Int64() or (column == "version" and dtype == pl.Int32())
    if spec.type == "number":
        return dtype == pl.Float64()
    if spec.type == "boolean":
        return dtype == pl.Boolean()
    return False


def parse_contract(data: bytes, *, where: str = "<contract>", digest: str = "") -> Contract:
    """A `Contract` from the bytes of a contract file; raises `ContractError` if it is not a valid one."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ContractError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ContractError(f"{where}: must be a JSON object")
    unknown = sorted(set(raw) - _CONTRACT_KEYS)
    if unknown:
        raise ContractError(f"{where}: unknown keys {unknown}")
    urn = raw.get("schema_urn")
    if not isinstance(urn, str) or not _URN_RE.match(urn):
        raise ContractError(f"{where}: 'schema_urn' must look like 'urn:<nid>:<name>', got {urn!r}")
    version = raw.get("version")
    if type(version) is not int or not 1 <= version < 2**31:
        raise ContractError(f"{where}: 'version' must be a positive integer, got {version!r}")
    title, description = raw.get("title", ""), raw.get("description", "")
    if not isinstance(title, str) or not isinstance(description, str):
        raise ContractError(f"{where}: 'title' and 'description' must be strings")
    contract = Contract(urn, version, _parse_fields(raw.get("fields"), where, nested=False), title,
                        description, digest)

    top = {spec.name: spec for spec in contract.fields}
    for name, ftype in _ENVELOPE.items():
        spec = top.get(name)
        if spec is None or spec.type != ftype or not spec.required:
            raise ContractError(f"{where}: must declare '{name}' as a required {ftype} field")
    for column, (_path, spec) in contract.columns().items():
        if column in _RESERVED_COLUMNS:
            raise ContractError(f"{where}: a field may not fill the pipeline's own column '{column}'")
        if not _compatible(spec, EVENT_SCHEMA[column], column):
            raise ContractError(
                f"{where}: field for column '{column}' has type {spec.type}, which cannot fill a "
                f"{EVENT_SCHEMA[column]} column"
            )
    return contract


class ContractRegistry:
    """The registered contracts, looked up by `(schema_urn, version)`. Immutable once built."""

    __slots__ = ("_by_key", "_versions")

    def __init__(self, contracts: Iterable[Contract]):
        by_key: dict[tuple[str, int], Contract] = {}
        for contract in contracts:
            key = (contract.schema_urn, contract.version)
            if key in by_key:
                raise ContractError(f"{key[0]} v{key[1]} is registered twice")
            by_key[key] = contract
        self._by_key = by_key
        versions: dict[str, list[int]] = {}
        for urn, version in sorted(by_key):
            versions.setdefault(urn, []).append(version)
        self._versions = {urn: tuple(v) for urn, v in versions.items()}

    @classmethod
    def load(cls, directory: Path = CONTRACTS_DIR, manifest: Path | None = None) -> ContractRegistry:
        """Load and verify every contract in `directory` against its digest manifest."""
        directory = Path(directory)
        manifest = Path(manifest) if manifest is not None else directory / MANIFEST_NAME
        if not manifest.is_file():
            raise ContractDigestError(f"digest manifest {manifest} is missing")
        pinned = read_manifest(manifest)
        present = {p.name: p for p in sorted(directory.glob("*.json"))}
        problems: list[str] = []
        for name in sorted(set(pinned) - set(present)):
            problems.append(f"{name} is registered in {manifest.name} but the file is gone")
        for name in sorted(set(present) - set(pinned)):
            problems.append(
                f"{name} is not registered in {manifest.name} "
                f"(run `python -m operators.contracts register`)"
            )
        contracts = []
        for name, path in present.items():
            if name not in pinned:
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest != pinned[name]:
                problems.append(
                    f"{name} changed after it was registered (sha256 {digest}, registered "
                    f"{pinned[name]}); a registered contract is immutable, add a new version instead"
                )
                continue
            contract = parse_contract(data, where=str(path), digest=digest)
            if contract.file_name != name:
                raise ContractError(
                    f"{path}: holds {contract.schema_urn} v{contract.version}, so it must be named "
                    f"{contract.file_name}"
                )
            contracts.append(contract)
        if problems:
            raise ContractDigestError(f"contracts in {directory}: " + "; ".join(problems))
        return cls(contracts)

    def get(self, schema_urn: str, version: int) -> Contract | None:
        return self._by_key.get((schema_urn, version))

    def versions(self, schema_urn: str) -> tuple[int, ...]:
        """Registered versions of `schema_urn`, ascending (empty if the urn is unknown)."""
        return self._versions.get(schema_urn, ())

    @property
    def urns(self) -> tuple[str, ...]:
        return tuple(self._versions)

    def __iter__(self):
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __repr__(self) -> str:
        keys = ", ".join(f"{u} v{v}" for u, v in sorted(self._by_key))
        return f"ContractRegistry({keys})"


@lru_cache(maxsize=1)
def default_registry() -> ContractRegistry:
    """The contracts shipped in `operators/contracts/` (loaded and verified once per process)."""
    return ContractRegistry.load(CONTRACTS_DIR)


def register_new(directory: Path = CONTRACTS_DIR) -> list[str]:
    """Append the digests of contract files the manifest does not list yet; returns their names.

    Never rewrites an existing line: a changed registered file still fails `ContractRegistry.load`.
    """
    directory = Path(directory)
    manifest = directory / MANIFEST_NAME
    pinned = read_manifest(manifest) if manifest.exists() else {}
    added: list[str] = []
    lines: list[str] = []
    for name, digest in compute_digests(directory).items():
        if name in pinned:
            continue
        parse_contract((directory / name).read_bytes(), where=str(directory / name))
        lines.append(f"{digest}  {name}\n")
        added.append(name)
    if lines:
        existing = manifest.read_text(encoding="utf-8") if manifest.exists() else ""
        if existing and not existing.endswith("\n"):
            existing += "\n"
        manifest.write_text(existing + "".join(lines), encoding="utf-8")
    return added


def _main(argv: list[str]) -> int:
    usage = "usage: python -m operators.contracts {check|register} [DIR]"
    if not argv or argv[0] not in ("check", "register"):
        print(usage, file=sys.stderr)
        return 2
    directory = Path(argv[1]) if len(argv) > 1 else CONTRACTS_DIR
    try:
        if argv[0] == "register":
            for name in register_new(directory):
                print(f"registered {name}")
        registry = ContractRegistry.load(directory)
    except ContractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {registry!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
