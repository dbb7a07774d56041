"""The config file: defaults, and one clear sentence naming the key for every mistake."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import re
import socket
import tomllib
from pathlib import Path

import pytest

from mta.config import (
    Config,
    ConfigError,
    HostPort,
    load,
    parse,
    parse_host_port,
)
from mta.policy.warmup import daily_cap

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "mta.toml"

TLS = 'tls_cert = "cert.pem"\ntls_key = "key.pem"\n'
DKIM = '[[dkim]]\ndomain = "example.com"\nselector = "s1"\nprivate_key = "k.pem"\n'


def parse_toml(text: str) -> Config:
    return parse(tomllib.loads(text))


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_toml(text)
    return str(caught.value)


# --- defaults ---


def test_empty_file_gives_the_documented_defaults() -> None:
    config = parse_toml("")
    server = config.server
    assert server.hostname == socket.gethostname()
    assert server.listen == (HostPort("127.0.0.1", 2525),)
    assert server.relay_networks == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert server.max_message_size == 25 * 2**20
    assert server.max_recipients == 1000
    assert server.max_connections == 1000
    assert server.max_connections_per_ip == 100
    assert server.idle_timeout == 300.0
    assert server.shutdown_timeout == 30.0
    assert (server.tls_cert, server.tls_key, server.users_file) == (None, None, None)
    assert config.spool.path == "var/spool"
    assert config.spool.max_size == 10 * 2**30
    assert config.spool.min_free_disk == 256 * 2**20
    assert config.metrics.listen == HostPort("127.0.0.1", 9125)
    assert config.log.level == "info"
    assert config.dkim == ()


def test_a_section_with_some_keys_keeps_defaults_for_the_rest() -> None:
    config = parse_toml("[server]\nmax_recipients = 5\n")
    assert config.server.max_recipients == 5
    assert config.server.max_connections == 1000
    assert config.spool.path == "var/spool"


def test_config_is_frozen() -> None:
    config = parse_toml("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.max_recipients = 1  # type: ignore[misc]


def test_values_are_converted_to_what_the_code_uses() -> None:
    config = parse_toml(
        "[server]\n"
        'listen = ["0.0.0.0:25", "[::1]:2525"]\n'
        'relay_networks = ["10.1.2.3/8", "2001:db8::/32"]\n'
        "idle_timeout = 10\n"
        "[metrics]\n"
        'listen = "[::]:9100"\n'
    )
    assert config.server.listen == (HostPort("0.0.0.0", 25), HostPort("::1", 2525))
    # A host address with a prefix means its network (strict=False).
    assert config.server.relay_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    # A TOML integer is a fine number of seconds, and becomes a float.
    assert config.server.idle_timeout == 10.0
    assert isinstance(config.server.idle_timeout, float)
    assert config.metrics.listen == HostPort("::", 9100)


def test_host_port_prints_ipv6_in_brackets() -> None:
    assert str(HostPort("::1", 25)) == "[::1]:25"
    assert str(HostPort("mx.example.com", 25)) == "mx.example.com:25"


def test_dkim_entries_are_read_in_order_with_domain_lowercased() -> None:
    config = parse_toml(
        DKIM + '[[dkim]]\ndomain = "Mail.Example.ORG."\nselector = "s2"\nprivate_key = "b.pem"\n'
    )
    assert [(key.domain, key.selector, key.private_key) for key in config.dkim] == [
        ("example.com", "s1", "k.pem"),
        ("mail.example.org", "s2", "b.pem"),
    ]


def test_tls_and_users_file_together_are_accepted() -> None:
    config = parse_toml("[server]\n" + TLS + 'users_file = "users"\n')
    assert (config.server.tls_cert, config.server.tls_key) == ("cert.pem", "key.pem")
    assert config.server.users_file == "users"


# --- unknown keys ---


def test_unknown_key_in_a_section_suggests_the_close_one() -> None:
    assert error_of("[server]\nmax_recipient = 5\n") == (
        '[server] unknown key max_recipient (did you mean "max_recipients"?)'
    )


def test_unknown_section_suggests_the_close_one() -> None:
    assert error_of("[sever]\n") == 'unknown key sever (did you mean "server"?)'


def test_unknown_key_with_nothing_close_has_no_suggestion() -> None:
    message = error_of("[spool]\nzzzzzz = 1\n")
    assert message == "[spool] unknown key zzzzzz"


def test_unknown_key_in_a_dkim_entry_names_the_entry() -> None:
    message = error_of(DKIM + 'selectr = "x"\n')
    assert message == '[[dkim]] #1 unknown key selectr (did you mean "selector"?)'


# --- wrong types ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[server]\nmax_recipients = "many"\n',
            '[server] max_recipients: expected an integer, got "many"',
        ),
        # TOML booleans are not numbers, even though Python's bool is an int.
        (
            "[server]\nmax_recipients = true\n",
            "[server] max_recipients: expected an integer, got true",
        ),
        ("[server]\nidle_timeout = false\n", "[server] idle_timeout: expected a number, got false"),
        (
            "[server]\nmax_recipients = 1.5\n",
            "[server] max_recipients: expected an integer, got 1.5",
        ),
        ("[spool]\npath = 5\n", "[spool] path: expected a string, got 5"),
        ('[server]\nlisten = "127.0.0.1:25"\n', "[server] listen: expected a list of strings"),
        ("[server]\nlisten = [25]\n", "[server] listen: expected a string, got 25"),
        (
            '[metrics]\nlisten = ["127.0.0.1:9125"]\n',
            "[metrics] listen: expected a string, got ['127.0.0.1:9125']",
        ),
    ],
)
def test_wrong_type_names_the_key_and_the_value(text: str, expected: str) -> None:
    assert error_of(text) == expected


# --- bad values ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[server]\nlisten = ["localhost"]\n',
            '[server] listen: expected "host:port", got "localhost"',
        ),
        (
            '[server]\nlisten = ["localhost:smtp"]\n',
            '[server] listen: expected "host:port", got "localhost:smtp"',
        ),
        ('[server]\nlisten = [":25"]\n', '[server] listen: expected "host:port", got ":25"'),
        (
            '[server]\nlisten = ["[::1]"]\n',
            '[server] listen: expected "host:port", got "[::1]"',
        ),
        (
            '[server]\nlisten = ["127.0.0.1:0"]\n',
            "[server] listen: port 0 is out of range 1-65535",
        ),
        (
            '[metrics]\nlisten = "127.0.0.1:65536"\n',
            "[metrics] listen: port 65536 is out of range 1-65535",
        ),
        ("[server]\nlisten = []\n", "[server] listen: give at least one host:port"),
        (
            '[server]\nrelay_networks = ["10.0.0.300/8"]\n',
            '[server] relay_networks: "10.0.0.300/8" is not a network such as "10.0.0.0/8"',
        ),
        (
            '[server]\nrelay_networks = ["everyone"]\n',
            '[server] relay_networks: "everyone" is not a network such as "10.0.0.0/8"',
        ),
        (
            "[server]\nmax_recipients = 0\n",
            "[server] max_recipients: must be greater than 0, got 0",
        ),
        (
            "[server]\nidle_timeout = -1.5\n",
            "[server] idle_timeout: must be greater than 0, got -1.5",
        ),
        ("[spool]\nmin_free_disk = -1\n", "[spool] min_free_disk: must be 0 or more, got -1"),
        ('[spool]\npath = "  "\n', "[spool] path: must not be empty"),
        ('[server]\nhostname = ""\n', "[server] hostname: must not be empty"),
        (
            '[log]\nlevel = "verbose"\n',
            '[log] level: expected one of debug, info, warning, error; got "verbose"',
        ),
    ],
)
def test_bad_value_names_the_key_and_says_what_is_wrong(text: str, expected: str) -> None:
    assert error_of(text) == expected


def test_zero_is_a_valid_shutdown_timeout_and_min_free_disk() -> None:
    config = parse_toml("[server]\nshutdown_timeout = 0\n[spool]\nmin_free_disk = 0\n")
    assert config.server.shutdown_timeout == 0.0
    assert config.spool.min_free_disk == 0


@pytest.mark.parametrize("text", ["::1", "[]:25"])
def test_host_port_without_a_usable_host_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_nan_is_not_a_valid_timeout() -> None:
    assert error_of("[server]\nidle_timeout = nan\n") == (
        "[server] idle_timeout: must be greater than 0, got nan"
    )


# --- cross-key rules ---


@pytest.mark.parametrize("half", ['tls_cert = "cert.pem"\n', 'tls_key = "key.pem"\n'])
def test_tls_cert_and_key_go_together(half: str) -> None:
    assert error_of("[server]\n" + half) == (
        "[server] tls_cert and tls_key go together: set both or neither"
    )


def test_users_file_without_tls_is_refused() -> None:
    assert error_of('[server]\nusers_file = "users"\n') == (
        "[server] users_file needs tls_cert and tls_key: AUTH is only offered over TLS"
    )


# --- [[dkim]] ---


@pytest.mark.parametrize("missing", ["domain", "selector", "private_key"])
def test_dkim_entry_missing_a_required_key_names_it(missing: str) -> None:
    lines = [line for line in DKIM.splitlines() if not line.startswith(missing)]
    assert error_of("\n".join(lines) + "\n") == (f"[[dkim]] #1: required key {missing} is missing")


def test_dkim_entry_number_points_at_the_bad_entry() -> None:
    text = DKIM + '[[dkim]]\ndomain = "a b"\nselector = "s"\nprivate_key = "k"\n'
    assert error_of(text) == '[[dkim]] #2 domain: "a b" is not a domain name'


def test_same_dkim_domain_and_selector_twice_is_refused() -> None:
    # Domains compare case-insensitively: they are lowercased first.
    second = DKIM.replace("example.com", "EXAMPLE.com").replace("k.pem", "other.pem")
    assert error_of(DKIM + second) == "[[dkim]]: example.com selector s1 is listed twice"


def test_same_dkim_domain_with_another_selector_is_fine() -> None:
    config = parse_toml(DKIM + DKIM.replace('"s1"', '"s2"'))
    assert [key.selector for key in config.dkim] == ["s1", "s2"]


# --- tables ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server = 5\n", "[server]: expected a table of keys"),
        ('log = "debug"\n', "[log]: expected a table of keys"),
        ('[dkim]\ndomain = "example.com"\n', "dkim: write each entry as a [[dkim]] table"),
        ('dkim = ["example.com"]\n', "[[dkim]] #1: expected a table of keys"),
    ],
)
def test_a_section_that_is_not_a_table_is_refused(text: str, expected: str) -> None:
    assert error_of(text) == expected


# --- load(): the file ---


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text('[spool]\npath = "/srv/spool"\n')
    assert load(path).spool.path == "/srv/spool"


def test_load_prefixes_errors_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text('[server]\nmax_recipients = "many"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == (
        f'{path}: [server] max_recipients: expected an integer, got "many"'
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: no such file$"):
        load(path)


def test_unreadable_path_says_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))}: cannot read: "):
        load(tmp_path)  # a directory


def test_invalid_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_text("[server]\nmax_recipients = \n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid TOML: ")
    assert "line 2" in message


def test_file_that_is_not_utf8_gives_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    path.write_bytes(b"# caf\xe9 (Latin-1)\n[server]\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: "):
        load(path)


# --- the example config in the repository ---


def test_example_config_parses() -> None:
    config = load(EXAMPLE)
    assert config.server.hostname == "mta.example.test"
    assert config.server.listen == (HostPort("127.0.0.1", 2525),)
    assert config.server.users_file == "var/users"
    assert config.server.tls_cert and config.server.tls_key
    assert [(key.domain, key.selector) for key in config.dkim] == [("example.test", "s2026")]


def test_example_config_shows_the_defaults_where_it_says_so() -> None:
    example, default = load(EXAMPLE), parse({})
    noted = {"hostname", "tls_cert", "tls_key", "users_file"}  # marked as examples in the file
    for section in ("server", "spool", "metrics", "log"):
        for spec in dataclasses.fields(getattr(default, section)):
            if spec.name in noted:
                continue
            shown = getattr(getattr(example, section), spec.name)
            assert shown == getattr(getattr(default, section), spec.name), (section, spec.name)


def test_the_multi_ip_example_in_the_traffic_policy_guide_is_a_valid_config() -> None:
    root = Path(__file__).resolve().parents[2]
    example = root / "etc" / "examples" / "multi-ip.toml"
    parsed = load(example)
    assert len(parsed.egress.source) == 8
    assert [s.name for s in parsed.egress.source if s.warmup] == ["ip7", "ip8"]
    assert {p.name for p in parsed.policy.provider} == {"gmail", "outlook", "yahoo"}
    guide = root / "docs" / "traffic-policy.md"
    assert example.read_text() in guide.read_text()  # shown verbatim


def test_the_configuration_reference_documents_every_key() -> None:
    root = Path(__file__).resolve().parents[2]
    guide = (root / "docs" / "configuration.md").read_text()

    def keys(cls: type, prefix: str) -> list[str]:
        found = []
        for spec in dataclasses.fields(cls):
            kind = spec.metadata.get("kind")
            path = f"{prefix}.{spec.name}" if prefix else spec.name
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                found += keys(kind, path)
            else:
                found.append(path)
        return found

    missing = [key for key in keys(Config, "") if f"`{key}`" not in guide]
    assert not missing, f"docs/configuration.md does not document: {missing}"


def test_every_alert_has_a_runbook() -> None:
    root = Path(__file__).resolve().parents[2]
    guide = (root / "docs" / "operations.md").read_text()
    alerts = (root / "etc" / "prometheus" / "mta-alerts.yml").read_text()
    for name in re.findall(r"alert: (\w+)", alerts):
        assert f"### {name}\n" in guide, name
        assert f"docs/operations.md#{name.lower()}" in alerts, name


def _warming(warmup: dict[str, object]) -> dict[str, object]:
    source = {"name": "ip7", "address": "127.0.0.7", "warmup": {"start": "2026-12-01"} | warmup}
    return {"egress": {"source": [source]}}


def test_a_warmup_plan_without_a_shape_is_the_standard_preset_and_ends_capped() -> None:
    [source] = parse(_warming({})).egress.source
    assert source.warmup is not None
    plan = source.warmup.plan_for("gmail")
    assert plan.schedule and plan.schedule == tuple(sorted(plan.schedule))
    assert daily_cap(plan, datetime.date(2030, 1, 1)) == plan.schedule[-1]  # never unlimited


def test_a_providers_own_plan_replaces_the_sources_way_of_growing_and_keeps_its_start() -> None:
    warmup = {
        "plan": "aggressive",
        "provider": {"gmail": {"plan": "conservative"}, "yahoo": {"cap": 300}},
    }
    [source] = parse(_warming(warmup)).egress.source
    assert source.warmup is not None
    gmail, yahoo, other = (source.warmup.plan_for(p) for p in ("gmail", "yahoo", "other"))
    assert gmail.schedule[0] < other.schedule[0] and gmail.start == other.start
    assert yahoo.schedule == other.schedule and yahoo.cap == 300


@pytest.mark.parametrize(
    ("warmup", "words"),
    [
        ({"plan": "fast"}, "expected one of conservative, standard, aggressive"),
        ({"plan": "standard", "first_day": 100}, "give a preset or first_day, not both"),
        ({"provider": {"gmial": {"plan": "standard"}}}, "warmup.provider.gmial: no provider"),
    ],
)
def test_a_bad_warmup_plan_is_refused_with_its_place(warmup: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse(_warming(warmup))
