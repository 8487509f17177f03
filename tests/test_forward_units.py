"""The forward proxy's plain parts: destination parsing, address classes, the egress
table, the ``port`` matcher field, the config keys, the pinned resolver, CONNECT heads."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from console.approvals_ui import always_rule_text, approval_line
from console.render import row_cells
from console.replay_whatif import facts_of
from proxy.approvals import Held
from proxy.config import ConfigError, load_config_text
from proxy.egress import (
    Authority,
    BadDestination,
    EgressTable,
    PinTable,
    check_addresses,
    compile_entry,
    non_public_reason,
    parse_authority,
)
from proxy.filter_language import parse_filter
from proxy.flows import flow_facts
from proxy.learned import rule_for
from proxy.matcher import Facts, MatcherError, compile_matcher
from proxy.policy import Policy
from proxy.server.forward import PinnedResolver
from proxy.server.forward_front import HeadError, parse_connect_head

# --------------------------------------------------------------------------- authorities


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("example.com:443", "example.com", 443),
        ("Example.COM.:8443", "example.com", 8443),
        ("10.0.0.5:80", "10.0.0.5", 80),
        ("[::1]:443", "::1", 443),
        ("[2001:DB8::1]:22", "2001:db8::1", 22),
    ],
)
def test_connect_authorities_parse(text: str, host: str, port: int) -> None:
    assert parse_authority(text) == Authority(host, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",
        "example.com:0",
        "example.com:65536",
        "example.com:http",
        "user@example.com:443",
        "example.com:443/path",
        "exa mple.com:443",
        "[::1:443",
        "[nothost]:443",
        "-bad-.com:443",
        "ex\u00e4mple.com:443",
    ],
)
def test_bad_connect_authorities_are_refused(text: str) -> None:
    with pytest.raises(BadDestination):
        parse_authority(text)


def test_authority_shows_ipv6_in_brackets() -> None:
    assert Authority("::1", 443).shown == "[::1]:443"
    assert Authority("example.com", 443).shown == "example.com:443"


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "word"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.0.0.5", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "CGNAT"),
        ("fd00::1", "unique local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", ""),  # reserved (Python calls it private)
        ("255.255.255.255", ""),
        ("192.0.2.1", ""),  # documentation range
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.5", "private"),
        ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
        ("2002:a00:5::1", "private"),  # 6to4 of 10.0.0.5
        ("::10.0.0.5", "private"),  # deprecated IPv4-compatible
    ],
)
def test_non_public_addresses_are_named(address: str, word: str) -> None:
    reason = non_public_reason(ipaddress.ip_address(address))
    assert reason is not None
    assert word in reason


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address: str) -> None:
    assert non_public_reason(ipaddress.ip_address(address)) is None


def test_one_private_answer_refuses_the_whole_name() -> None:
    verdict = check_addresses("mixed.test", ["93.184.216.34", "10.0.0.5"], allow_private=False)
    assert not verdict.ok and "10.0.0.5" in (verdict.refused or "")
    verdict = check_addresses("mixed.test", ["93.184.216.34", "10.0.0.5"], allow_private=True)
    assert verdict.ok and verdict.addresses == ("93.184.216.34", "10.0.0.5")


def test_no_answer_or_garbage_is_a_refusal() -> None:
    assert not check_addresses("x.test", [], allow_private=True).ok
    assert not check_addresses("x.test", ["not-an-ip"], allow_private=True).ok


def test_scoped_ipv6_answers_are_checked_without_their_zone() -> None:
    verdict = check_addresses("x.test", ["fe80::1%eth0"], allow_private=False)
    assert not verdict.ok and "link-local" in (verdict.refused or "")


# --------------------------------------------------------------------------- egress table


def test_first_matching_egress_entry_applies() -> None:
    table = EgressTable(
        [
            compile_entry("gh-ssh", ["github.com"], [22], "passthrough", False),
            compile_entry("gh", ["github.com", "*.github.com"], None, "intercept", False),
            compile_entry("lab", ["*.test"], [443, 8443], "intercept", True),
        ],
        "passthrough",
    )
    assert table.match("github.com", 22).name == "gh-ssh"  # type: ignore[union-attr]
    assert table.match("API.GitHub.com", 443).name == "gh"  # type: ignore[union-attr]
    assert table.match("repo.test", 80) is None
    assert table.target_name(None) == "egress"
    assert table.tls_mode(None) == "passthrough"
    assert table.tls_mode(table.match("repo.test", 443)) == "intercept"


def test_the_pin_table_is_bounded_and_answers_only_what_was_pinned() -> None:
    pins = PinTable(capacity=2)
    pins.pin("A.test", ["127.0.0.1"])
    pins.pin("b.test", ["127.0.0.2"])
    pins.pin("c.test", ["127.0.0.3"])
    assert pins.lookup("a.test") == ()
    assert pins.lookup("B.test.") == ("127.0.0.2",)


@pytest.mark.asyncio
async def test_the_pinned_resolver_never_asks_dns() -> None:
    pins = PinTable()
    resolver = PinnedResolver(pins)
    with pytest.raises(OSError):
        await resolver.resolve("example.com", 443)
    pins.pin("example.com", ["127.0.0.1", "::1"])
    answers = await resolver.resolve("example.com", 443)
    assert [(a["host"], a["family"], a["hostname"]) for a in answers] == [
        ("127.0.0.1", socket.AF_INET, "example.com"),
        ("::1", socket.AF_INET6, "example.com"),
    ]


# --------------------------------------------------------------------------- matcher


def test_port_field_in_rules() -> None:
    single = compile_matcher({"port": 443})
    listed = compile_matcher({"port": [22, 443]})
    ranged = compile_matcher({"port": "8000-8999"})
    assert single.matches(Facts(port=443)) and not single.matches(Facts(port=444))
    assert listed.matches(Facts(port=22)) and not listed.matches(Facts(port=80))
    assert ranged.matches(Facts(port=8443)) and not ranged.matches(Facts(port=9000))
    assert not single.matches(Facts(port=None))  # target requests have no port


@pytest.mark.parametrize("value", [0, 70000, "443-80", "https", True, []])
def test_bad_ports_are_refused(value: object) -> None:
    with pytest.raises(MatcherError):
        compile_matcher({"port": value})


def test_port_and_host_in_console_filters() -> None:
    matcher = parse_filter("host:*.github.com port:443,8000-8999")
    flow = {"host": "api.github.com", "port": 443, "method": "GET", "path": "/"}
    assert matcher.matches(flow_facts(flow))
    assert not matcher.matches(flow_facts({**flow, "port": 22}))


def test_an_exact_host_names_a_destination_but_a_glob_does_not() -> None:
    policy = Policy.from_tables(
        [
            {"name": "exact", "host": "Repo.Test", "action": "allow"},
            {"name": "glob", "host": "*.test", "action": "allow"},
        ]
    )
    assert policy.names_host("exact", "repo.test")
    assert not policy.names_host("exact", "other.test")
    assert not policy.names_host("glob", "repo.test")
    assert not policy.names_host(None, "repo.test")


# --------------------------------------------------------------------------- config


def config(text: str) -> str:
    return f'[proxy]\nstate_dir = "state"\n{text}'


def test_egress_config_loads(tmp_path: Path) -> None:
    loaded = load_config_text(
        config(
            """
[forward]
ca_bundle = "certs/bundle.pem"
default_tls = "passthrough"

[[egress]]
name = "github"
host = ["github.com", "*.github.com"]
ports = [443]
tls = "intercept"

[[rules]]
name = "gh"
target = "github"
action = "allow"

[[rules]]
name = "rest"
target = "egress"
port = 443
action = "deny"
"""
        ),
        tmp_path / "sluice.toml",
    )
    assert loaded.ca_bundle_path == tmp_path / "certs" / "bundle.pem"
    assert loaded.egress.default_tls == "passthrough"
    assert loaded.egress.match("api.github.com", 443).name == "github"  # type: ignore[union-attr]
    assert loaded.egress.match("api.github.com", 22) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[egress]]\nname = "a"\nhost = "x"\nports = [0]\n', "ports"),
        ('[[egress]]\nname = "a"\nhost = "x"\ntls = "sometimes"\n', "tls"),
        ('[[egress]]\nname = "egress"\nhost = "x"\n', "taken"),
        ('[[egress]]\nname = "a"\nhost = "x"\n[[egress]]\nname = "a"\nhost = "y"\n', "duplicate"),
        ('[[egress]]\nname = "a"\nhost = "x[1"\n', "unclosed"),
        ('[[targets]]\nname = "egress"\nupstream = "http://127.0.0.1:1"\n', "forward-proxy"),
        ('[[rules]]\nname = "r"\ntarget = "nope"\naction = "allow"\n', "unknown target"),
        ('[[rules]]\nname = "r"\nport = "http"\naction = "allow"\n', "port"),
    ],
)
def test_bad_egress_config_is_refused_with_its_line(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config_text(config(text), tmp_path / "sluice.toml")
    assert message in str(caught.value)
    assert "sluice.toml:" in str(caught.value)


# --------------------------------------------------------------------------- CONNECT heads


def test_connect_heads_parse_strictly() -> None:
    head = parse_connect_head(
        b"CONNECT repo.test:443 HTTP/1.1\r\nHost: repo.test:443\r\nProxy-Authorization: Bearer t"
    )
    assert head.authority == "repo.test:443"
    assert head.get("proxy-authorization") == "Bearer t"


@pytest.mark.parametrize(
    "data",
    [
        b"CONNECT repo.test:443\r\n",
        b"CONNECT  repo.test:443 HTTP/1.1",
        b"CONNECT repo.test:443 HTTP/2\r\n",
        b"CONNECT repo.test:443 HTTP/1.1\r\nBad Header: x",
        b"CONNECT repo.test:443 HTTP/1.1\r\n folded: x",
        b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: a\r\nProxy-Authorization: b",
        b"CONNECT a:1 HTTP/1.1\r\nContent-Length: 5",
        b"CONNECT a:1 HTTP/1.1\r\nTransfer-Encoding: chunked",
        b"CONNECT a:1 HTTP/1.1\r\nX: a\x00b",
    ],
)
def test_bad_connect_heads_are_refused(data: bytes) -> None:
    with pytest.raises(HeadError):
        parse_connect_head(data)


# --------------------------------------------------------------------------- console


def test_console_rows_show_the_destination_of_forward_flows() -> None:
    cells = row_cells(
        {"method": "GET", "host": "repo.test", "port": 443, "path": "/x", "target": "lab"},
        lambda _: "",
    )
    assert cells["path"][0] == "repo.test:443/x"
    cells = row_cells({"method": "GET", "path": "/x", "target": "repo"}, lambda _: "")
    assert cells["path"][0] == "/x"


def test_replay_what_if_sees_forward_destinations() -> None:
    facts = facts_of(
        {"method": "GET", "target": "lab", "url": "https://repo.test:8443/a%20b?q=1"}, "s", ()
    )
    assert (facts.host, facts.port, facts.path, facts.query) == ("repo.test", 8443, "/a b", "q=1")
    facts = facts_of({"method": "CONNECT", "target": "lab", "url": "repo.test:443"}, "s", ())
    assert (facts.host, facts.port, facts.path) == ("repo.test", 443, "/")


# --------------------------------------------------------------------------- learned rules


def _held(method: str, path: str, host: str | None, port: int | None) -> Held:
    return Held(
        id="ap-x-1",
        request_id="r",
        session="s",
        subject="agent",
        method=method,
        target="egress",
        path=path,
        query="",
        rule="ask",
        reason="why",
        preview="",
        body_sha256="",
        fingerprint="f",
        created=0.0,
        deadline=1.0,
        host=host,
        port=port,
    )


@pytest.mark.asyncio  # a Held carries a future
async def test_an_always_approval_of_a_forward_request_stays_bound_to_its_destination() -> None:
    rule = rule_for(_held("POST", "/deploy", "api.example.com", 443), "allow", "bob")
    assert (rule["host"], rule["port"], rule["path"]) == ("api.example.com", 443, "/deploy")
    policy = Policy.from_tables([rule])
    same = Facts(method="POST", target="egress", path="/deploy", host="api.example.com", port=443)
    assert policy.evaluate(same).allowed  # type: ignore[union-attr]
    other = Facts(method="POST", target="egress", path="/deploy", host="evil.example", port=443)
    assert not policy.evaluate(other).allowed  # type: ignore[union-attr]
    # an approval never opens private addresses, even though it names the host exactly
    assert not policy.names_host(rule["name"], "api.example.com")


@pytest.mark.asyncio  # a Held carries a future
async def test_an_always_approval_of_a_connect_matches_the_connect() -> None:
    rule = rule_for(_held("CONNECT", "repo.test:443", "repo.test", 443), "allow", "bob")
    assert "path" not in rule and "query" not in rule
    facts = Facts(method="CONNECT", target="egress", path="/", host="repo.test", port=443)
    assert Policy.from_tables([rule]).evaluate(facts).allowed  # type: ignore[union-attr]


@pytest.mark.asyncio  # a Held carries a future
async def test_target_approvals_summaries_are_unchanged() -> None:
    held = _held("POST", "/deploy", None, None)
    assert "host" not in held.summary() and "host" not in rule_for(held, "allow", "bob")


def test_console_approval_lines_show_a_forward_destination() -> None:
    summary = {
        "method": "POST",
        "target": "lab",
        "path": "/deploy",
        "host": "repo.test",
        "port": 443,
        "subject": "agent",
        "rule": "ask",
        "deadline": None,
    }
    assert "repo.test:443/deploy" in approval_line(summary, 0.0).plain
    assert "host=repo.test port=443 path=/deploy" in always_rule_text(summary).plain
    connect = {**summary, "method": "CONNECT", "path": "repo.test:443"}
    assert "path=" not in always_rule_text(connect).plain
    target = {k: v for k, v in summary.items() if k not in ("host", "port")}
    assert "lab /deploy" in approval_line(target, 0.0).plain


def test_an_address_glob_matches_addresses_only_never_a_name_spelled_like_one() -> None:
    table = EgressTable(
        [
            compile_entry("lan", ["10.*", "192.168.?.1"], None, "passthrough", True),
            compile_entry("any", ["*"], None, "intercept", False),
        ],
    )
    assert table.match("10.1.2.3", 443).name == "lan"  # type: ignore[union-attr]
    assert table.match("192.168.7.1", 443).name == "lan"  # type: ignore[union-attr]
    # a name that merely starts like the address falls through to the catch-all
    assert table.match("10.attacker.com", 443).name == "any"  # type: ignore[union-attr]
    assert table.match("192.168.7.1.nip.io", 443).name == "any"  # type: ignore[union-attr]
    assert table.match("10.1.2.3", 443) is not table.match("10.attacker.com", 443)
