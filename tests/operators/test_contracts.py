"""The contract registry: shipped contracts, digest pinning, immutability, new versions."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from operators.contracts import (
    CONTRACTS_DIR,
    MANIFEST_NAME,
    ContractDigestError,
    ContractError,
    ContractRegistry,
    _main,
    compute_digests,
    contract_file_name,
    default_registry,
    parse_contract,
    read_manifest,
    register_new,
)

WEB = "urn:nc:events:web"
V1_FILE = "urn_nc_events_web.v1.json"

# Digests of contracts that have been released. A registered contract never changes: if this fails,
# restore the file and add a new version instead.
RELEASED = {
    V1_FILE: "894c4f2b2c9522ec78312438b0bdf517cb58a28a6206a7a2f88f62a2c9ae0c76",
}


@pytest.fixture
def contracts_copy(tmp_path: Path) -> Path:
    target = tmp_path / "contracts"
    shutil.copytree(CONTRACTS_DIR, target)
    return target


def _write_contract(directory: Path, data: dict) -> Path:
    path = directory / contract_file_name(data["schema_urn"], data["version"])
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    return path


def _v1_definition() -> dict:
    return orjson.loads((CONTRACTS_DIR / V1_FILE).read_bytes())


# --- what ships ---------------------------------------------------------------------------------


def test_default_registry_holds_web_v1():
    registry = default_registry()
    assert registry.urns == (WEB,)
    assert registry.versions(WEB) == (1,)
    assert registry.versions("urn:nc:events:nope") == ()
    assert registry.get(WEB, 2) is None
    contract = registry.get(WEB, 1)
    assert contract is not None
    assert (WEB, 1) in registry and len(registry) == 1
    assert contract.digest == RELEASED[V1_FILE]
    assert contract.file_name == V1_FILE


def test_web_v1_fields():
    contract = default_registry().get(WEB, 1)
    fields = {f.name: f for f in contract.fields}
    required = {n for n, f in fields.items() if f.required}
    assert required == {"schema_urn", "version", "event_id", "type", "timestamp", "tenant"}
    assert {n: f.type for n, f in fields.items()} == {
        "schema_urn": "string",
        "version": "integer",
        "event_id": "string",
        "type": "string",
        "timestamp": "timestamp",
        "tenant": "string",
        "user_id": "string",
        "session_id": "string",
        "ip": "string",
        "user_agent": "string",
        "url": "string",
        "correlation_id": "string",
        "properties": "object",
        "error": "object",
    }
    assert fields["properties"].fields is None
    error_members = {m.name: (m.type, m.required) for m in fields["error"].fields}
    assert error_members == {"message": ("string", False), "stack": ("string", False)}
    assert set(contract.columns()) == {
        "schema_urn", "version", "event_id", "type", "timestamp", "tenant", "user_id",
        "session_id", "ip", "user_agent", "url", "correlation_id", "properties",
        "error_message", "error_stack",
    }  # fmt: skip


# --- immutability -------------------------------------------------------------------------------


def test_every_contract_file_matches_its_registered_digest():
    """Fails when a registered contract is edited: add a new version file instead."""
    pinned = read_manifest(CONTRACTS_DIR / MANIFEST_NAME)
    actual = compute_digests(CONTRACTS_DIR)
    assert set(actual) == set(pinned), "every contract file is registered, no registered file is gone"
    for name, digest in actual.items():
        assert digest == pinned[name], f"{name} changed after it was registered"


def test_released_contracts_are_unchanged():
    pinned = read_manifest(CONTRACTS_DIR / MANIFEST_NAME)
    for name, digest in RELEASED.items():
        assert pinned.get(name) == digest, f"{name} was re-registered with a different digest"
        assert hashlib.sha256((CONTRACTS_DIR / name).read_bytes()).hexdigest() == digest


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=CONTRACTS_DIR, capture_output=True, check=False, timeout=60
    )


def test_manifest_only_grows_over_history():
    """Every digest line ever committed is still in the manifest, and every file a committed manifest
    listed had exactly that digest in that commit."""
    try:
        inside = _git("rev-parse", "--is-inside-work-tree")
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("git is not available")
    if inside.returncode != 0:
        pytest.skip("not a git checkout")
    current = read_manifest(CONTRACTS_DIR / MANIFEST_NAME)
    commits = _git("log", "--format=%H", "--", ".").stdout.decode().split()
    if not commits:
        pytest.skip("contracts not committed yet")
    prefix = _git("rev-parse", "--show-prefix").stdout.decode().strip()
    for commit in commits:
        shown = _git("show", f"{commit}:{prefix}{MANIFEST_NAME}")
        if shown.returncode != 0:
            continue
        lines = [ln for ln in shown.stdout.decode().splitlines() if ln and not ln.startswith("#")]
        for line in lines:
            digest, name = line.split(maxsplit=1)
            name = name.lstrip("*")
            assert current.get(name) == digest, (
                f"{name}: registered as {digest} in {commit[:10]}, the manifest now says "
                f"{current.get(name)}; registered contracts are immutable"
            )
            blob = _git("show", f"{commit}:{prefix}{name}")
            assert blob.returncode == 0, f"{name} listed in {commit[:10]} but not committed there"
            assert hashlib.sha256(blob.stdout).hexdigest() == digest, (
                f"{name} in {commit[:10]} does not match its registered digest"
            )


def test_tampered_contract_is_refused(contracts_copy: Path):
    path = contracts_copy / V1_FILE
    path.write_bytes(path.read_bytes().replace(b'"required": true', b'"required": false', 1))
    with pytest.raises(ContractDigestError, match=rf"{V1_FILE} changed after it was registered"):
        ContractRegistry.load(contracts_copy)


def test_whitespace_change_is_a_change_too(contracts_copy: Path):
    path = contracts_copy / V1_FILE
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.raises(ContractDigestError, match="immutable"):
        ContractRegistry.load(contracts_copy)


def test_unregistered_contract_is_refused(contracts_copy: Path):
    data = _v1_definition() | {"version": 2}
    _write_contract(contracts_copy, data)
    with pytest.raises(ContractDigestError, match="urn_nc_events_web.v2.json is not registered"):
        ContractRegistry.load(contracts_copy)


def test_removed_contract_is_refused(contracts_copy: Path):
    (contracts_copy / V1_FILE).unlink()
    with pytest.raises(ContractDigestError, match=f"{V1_FILE} is registered .* the file is gone"):
        ContractRegistry.load(contracts_copy)


def test_missing_manifest_is_refused(contracts_copy: Path):
    (contracts_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ContractDigestError, match="manifest .* is missing"):
        ContractRegistry.load(contracts_copy)


def test_garbled_manifest_is_refused(contracts_copy: Path):
    with (contracts_copy / MANIFEST_NAME).open("a") as fh:
        fh.write("not a digest line\n")
    with pytest.raises(ContractDigestError, match="not a '<sha256>  <file>' line"):
        ContractRegistry.load(contracts_copy)


# --- new versions and urns are new files ---------------------------------------------------------


def test_register_new_version_appends_only(contracts_copy: Path):
    before = (contracts_copy / MANIFEST_NAME).read_text()
    data = _v1_definition() | {"version": 2}
    data["fields"] = [*data["fields"], {"name": "channel", "type": "string", "required": True}]
    _write_contract(contracts_copy, data)
    other = {
        "schema_urn": "urn:nc:events:mobile",
        "version": 1,
        "fields": [
            {"name": "schema_urn", "type": "string", "required": True},
            {"name": "version", "type": "integer", "required": True},
            {"name": "event_id", "type": "string", "required": True},
            {"name": "timestamp", "type": "timestamp", "required": True},
            {"name": "app_version", "type": "string", "required": True},
        ],
    }
    _write_contract(contracts_copy, other)

    assert register_new(contracts_copy) == [
        "urn_nc_events_mobile.v1.json",
        "urn_nc_events_web.v2.json",
    ]
    after = (contracts_copy / MANIFEST_NAME).read_text()
    assert after.startswith(before)
    assert register_new(contracts_copy) == []  # idempotent

    registry = ContractRegistry.load(contracts_copy)
    assert registry.versions(WEB) == (1, 2)
    assert registry.versions("urn:nc:events:mobile") == (1,)
    assert [f.name for f in registry.get(WEB, 2).fields][-1] == "channel"


def test_register_does_not_paper_over_a_change(contracts_copy: Path):
    path = contracts_copy / V1_FILE
    path.write_bytes(path.read_bytes().replace(b"Always 1.", b"Always one."))
    assert register_new(contracts_copy) == []
    with pytest.raises(ContractDigestError):
        ContractRegistry.load(contracts_copy)


def test_cli_check_and_register(contracts_copy: Path, capsys):
    assert _main(["check", str(contracts_copy)]) == 0
    assert "urn:nc:events:web v1" in capsys.readouterr().out
    _write_contract(contracts_copy, _v1_definition() | {"version": 3})
    assert _main(["check", str(contracts_copy)]) == 1
    assert "not registered" in capsys.readouterr().err
    assert _main(["register", str(contracts_copy)]) == 0
    assert "registered urn_nc_events_web.v3.json" in capsys.readouterr().out
    assert _main([]) == 2


# --- contract definitions are checked -----------------------------------------------------------


def _fields_with(**changes: dict) -> list[dict]:
    fields = _v1_definition()["fields"]
    return [f | changes.get(f["name"], {}) for f in fields]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"fields": _fields_with(ip={"type": "ipaddr"})}, "'type' must be one of"),
        ({"fields": _fields_with(ip={"type": "integer"})}, "column 'ip' has type integer"),
        ({"fields": _fields_with(event_id={"required": False})}, "must declare 'event_id'"),
        ({"fields": _fields_with(timestamp={"type": "string"})}, "must declare 'timestamp'"),
        ({"fields": _fields_with(url={"required": "yes"})}, "'required' must be true or false"),
        ({"fields": _fields_with(url={"fields": []})}, "only an object field may declare"),
        ({"fields": _fields_with(url={"colour": "red"})}, "unknown keys"),
        ({"fields": []}, "'fields' must be a non-empty list"),
        ({"schema_urn": "web events"}, "'schema_urn' must look like"),
        ({"version": 0}, "'version' must be a positive integer"),
        ({"version": True}, "'version' must be a positive integer"),
        ({"owner": "me"}, "unknown keys"),
    ],
)
def test_invalid_definitions_are_refused(data: dict, message: str):
    with pytest.raises(ContractError, match=message):
        parse_contract(orjson.dumps(_v1_definition() | data))


def test_duplicate_and_reserved_fields_are_refused():
    fields = _v1_definition()["fields"]
    with pytest.raises(ContractError, match="declared twice"):
        parse_contract(orjson.dumps(_v1_definition() | {"fields": [*fields, fields[-1]]}))
    source = {"name": "source", "type": "string"}
    with pytest.raises(ContractError, match="pipeline's own column 'source'"):
        parse_contract(orjson.dumps(_v1_definition() | {"fields": [*fields, source]}))


def test_nested_members_may_not_nest_further():
    fields = _fields_with(
        error={"fields": [{"name": "cause", "type": "object", "fields": [{"name": "x", "type": "string"}]}]}
    )
    with pytest.raises(ContractError, match="may not declare 'fields' themselves"):
        parse_contract(orjson.dumps(_v1_definition() | {"fields": fields}))


def test_file_name_must_match_content(contracts_copy: Path):
    data = _v1_definition() | {"version": 2}
    wrong = contracts_copy / "urn_nc_events_web.v9.json"
    wrong.write_bytes(orjson.dumps(data))
    register_new_lines = f"{hashlib.sha256(wrong.read_bytes()).hexdigest()}  {wrong.name}\n"
    with (contracts_copy / MANIFEST_NAME).open("a") as fh:
        fh.write(register_new_lines)
    with pytest.raises(ContractError, match="must be named urn_nc_events_web.v2.json"):
        ContractRegistry.load(contracts_copy)
