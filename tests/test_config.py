"""Config loading: the sample loads, and every rejection names its file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import (
    Config,
    ConfigError,
    ConfigIssue,
    default_config_path,
    load_config,
    load_config_text,
)
from proxy.matcher import Facts
from proxy.policy import NEEDS_BODY, Action
from proxy.units import format_duration, parse_duration, parse_size

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE = REPO_ROOT / "sample_config.toml"
MARK = "# <-"


def write(tmp_path: Path, text: str, name: str = "sluice.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def marked_line(path: Path) -> int:
    """The 1-based line carrying the ``# <-`` marker: where the error must point."""
    lines = path.read_text(encoding="utf-8").splitlines()
    hits = [number for number, line in enumerate(lines, start=1) if MARK in line]
    assert len(hits) == 1, "test config must mark exactly one line"
    return hits[0]


def issues_of(path: Path) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.issues, "a ConfigError must carry at least one issue"
    return info.value.issues


def single_issue(tmp_path: Path, text: str) -> ConfigIssue:
    path = write(tmp_path, text)
    issues = issues_of(path)
    assert len(issues) == 1, [str(issue) for issue in issues]
    issue = issues[0]
    assert issue.file == str(path.absolute())
    assert issue.line == marked_line(path), str(issue)
    # The rendered message is what a person reads: it leads with file:line.
    assert str(issue).startswith(f"{path.absolute()}:{issue.line}: "), str(issue)
    return issue


TARGET = """
[[targets]]
name = "repo"
upstream = "http://127.0.0.1:9000"
"""


# --- the sample --------------------------------------------------------------------------


def test_sample_config_loads() -> None:
    config = load_config(SAMPLE)
    assert isinstance(config, Config)
    assert config.path == SAMPLE.absolute()
    assert config.proxy.listen == "127.0.0.1:8700"
    assert config.proxy.admin_listen == "127.0.0.1:8701"
    assert config.proxy.drain_timeout == 10.0
    assert config.identity.mode in ("none", "local", "oidc")
    assert config.limits.max_header_size == 16 * 1024
    assert config.limits.max_body_size == 64 * 1024 * 1024
    assert config.limits.max_body_inspect == 1024 * 1024
    assert config.limits.body_timeout == 120.0
    assert {"repo", "build"} <= set(config.targets)
    assert config.targets["repo"].upstream == "http://127.0.0.1:9000"
    names = [rule.name for rule in config.policy.rules]
    assert names[:2] == ["no-exfiltration", "credential-files"]
    assert {"push-to-main", "push-agent-branches", "repo-read", "build-read"} <= set(names)
    assert names.index("push-to-main") < names.index("push-agent-branches")
    assert config.policy.max_body_inspect == config.limits.max_body_inspect
    assert config.policy.reads_bodies
    assert len(config.digest) == 12
    assert config.state_dir == REPO_ROOT / ".sluice"


def test_sample_config_policy_decides_sample_requests() -> None:
    policy = load_config(SAMPLE).policy
    env = policy.evaluate(Facts(method="GET", target="repo", path="/files/app/.env"))
    assert env.action is Action.DENY and env.rule == "credential-files"
    leak = Facts(method="POST", target="build", path="/api/builds", carries_secret=True)
    assert policy.evaluate(leak).rule == "no-exfiltration"
    read = policy.evaluate(Facts(method="GET", target="repo", path="/files/README.md"))
    assert read.action is Action.ALLOW and read.rule == "repo-read"
    push = Facts(method="POST", target="repo", path="/api/push")
    assert policy.evaluate(push) is NEEDS_BODY
    push = Facts(method="POST", target="repo", path="/api/push", carries_secret=False)
    assert policy.evaluate(push) is NEEDS_BODY
    to_main = policy.evaluate(Facts(**{**_facts_dict(push), "body": b'{"branch": "main"}'}))
    assert to_main.action is Action.APPROVE and to_main.rule == "push-to-main"
    to_agent = policy.evaluate(Facts(**{**_facts_dict(push), "body": b'{"branch":"agent/x"}'}))
    assert to_agent.action is Action.ALLOW and to_agent.rule == "push-agent-branches"
    delete = policy.evaluate(Facts(method="DELETE", target="build", path="/api/builds/1"))
    assert delete.action is Action.DENY and delete.rule is None


def _facts_dict(facts: Facts) -> dict[str, object]:
    return {name: getattr(facts, name) for name in Facts.__slots__}


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.targets == {}
    assert config.policy.rules == ()
    assert config.limits.max_headers == 100
    assert config.events.buffer == 10000


def test_load_config_text_and_digest_tracks_content(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    one = load_config_text(TARGET, path)
    two = load_config_text(TARGET + "\n# a comment\n", path)
    assert one.digest != two.digest
    assert load_config_text(TARGET, path).digest == one.digest


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    issues = issues_of(missing)
    assert issues[0].file == str(missing)
    assert "cannot read config" in issues[0].message


# --- unknown keys ------------------------------------------------------------------------


def test_key_after_a_table_header_belongs_to_that_table(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [proxy]
        listen = "127.0.0.1:8700"

        colour = "blue"  # <-
        """,
    )
    # A top-level key after [proxy] belongs to [proxy] in TOML; put it first instead.
    assert issue.where == "proxy.colour"
    assert issue.message == "unknown key"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        # leading comment
        colour = "blue"  # <-
        [proxy]
        listen = "127.0.0.1:8700"
        """,
    )
    assert issue.where == "colour"
    assert issue.message == "unknown key"


def test_unknown_key_in_proxy(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [proxy]
        listen = "127.0.0.1:8700"
        lisen = "127.0.0.1:8700"  # <-
        """,
    )
    assert issue.where == "proxy.lisen"
    assert issue.message == "unknown key"


def test_unknown_key_in_a_target(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[targets]]
        name = "repo"
        upstream = "http://127.0.0.1:9000"

        [[targets]]
        name = "build"
        upstream = "http://127.0.0.1:9001"
        timeout = "5s"  # <-
        """,
    )
    assert issue.where == "targets[1].timeout"
    assert issue.message == "unknown key"


def test_unknown_key_in_second_rule(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        TARGET
        + """
        [[rules]]
        name = "first"
        target = "repo"
        action = "allow"

        [[rules]]
        name = "second"
        target = "repo"
        pathh = "/x"  # <-
        action = "deny"
        """,
    )
    assert issue.where == "rules[1].pathh"
    assert "pathh" in issue.message and "unknown field" in issue.message


# --- types and units ---------------------------------------------------------------------


def test_string_where_int_expected(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [limits]
        max_connections = 10
        max_headers = "100"  # <-
        """,
    )
    assert issue.where == "limits.max_headers"
    assert "integer" in issue.message


def test_int_where_string_expected(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [proxy]
        listen = "127.0.0.1:8700"
        state_dir = 5  # <-
        """,
    )
    assert issue.where == "proxy.state_dir"
    assert "string" in issue.message


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    issue = single_issue(tmp_path, "[events]\nbuffer = true  # <-\n")
    assert issue.where == "events.buffer"


@pytest.mark.parametrize("value", ['"10"', '"ten s"', "10", '"10 years"', '"-5s"'])
def test_bad_duration(tmp_path: Path, value: str) -> None:
    issue = single_issue(
        tmp_path,
        f"""
        [limits]
        header_timeout = "10s"
        body_timeout = {value}  # <-
        """,
    )
    assert issue.where == "limits.body_timeout"
    assert "duration" in issue.message


@pytest.mark.parametrize("value", ['"64XB"', '"1.5MiB"', "-1", '"lots"', "true"])
def test_bad_size(tmp_path: Path, value: str) -> None:
    issue = single_issue(
        tmp_path,
        f"""
        [limits]
        max_body_size = {value}  # <-
        """,
    )
    assert issue.where == "limits.max_body_size"
    assert "size" in issue.message


def test_out_of_range_int(tmp_path: Path) -> None:
    issue = single_issue(tmp_path, "[events]\nbuffer = 5  # <-\n")
    assert issue.where == "events.buffer"


def test_several_issues_all_reported_with_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [proxy]
        listen = "nope"
        [limits]
        header_timeout = "10"
        max_body_size = "big"
        """,
    )
    issues = issues_of(path)
    assert {(issue.where, issue.line) for issue in issues} == {
        ("proxy.listen", 2),
        ("limits.header_timeout", 4),
        ("limits.max_body_size", 5),
    }


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("5m", 300.0), ("250ms", 0.25), ("1h", 3600.0), ("1d", 86400.0)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["10", "ten s", "", "5 minutes", 10, 1.5, True, None])
def test_durations_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_durations_in_config(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            [proxy]
            drain_timeout = "90s"
            [limits]
            upstream_timeout = "5m"
            upstream_connect_timeout = "250ms"
            """,
        )
    )
    assert config.proxy.drain_timeout == 90.0
    assert config.limits.upstream_timeout == 300.0
    assert config.limits.upstream_connect_timeout == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("value", "size"),
    [("64MiB", 64 * 1024 * 1024), (1024, 1024), ("1KB", 1000), ("16KiB", 16384), ("7", 7)],
)
def test_sizes_parse(value: object, size: int) -> None:
    assert parse_size(value) == size


def test_sizes_in_config(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[limits]\nmax_body_size = "64MiB"\nmax_body_inspect = 1024\n')
    )
    assert config.limits.max_body_size == 64 * 1024 * 1024
    assert config.limits.max_body_inspect == 1024
    assert config.policy.max_body_inspect == 1024


@pytest.mark.parametrize("seconds", [0.25, 1.0, 90.0, 300.0, 3600.0, 86400.0, 1.5])
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


# --- targets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "upstream",
    [
        "ftp://files.example.com",
        "http://",
        "http://:8080",
        "http://example.com/?q=1",
        "http://example.com#frag",
        "example.com",
    ],
)
def test_bad_upstream(tmp_path: Path, upstream: str) -> None:
    issue = single_issue(
        tmp_path,
        f"""
        [[targets]]
        name = "repo"
        upstream = "{upstream}"  # <-
        """,
    )
    assert issue.where == "targets[0].upstream"


def test_upstream_trailing_slash_dropped(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[[targets]]\nname = "r"\nupstream = "https://example.com/base/"\n')
    )
    assert config.targets["r"].upstream == "https://example.com/base"


def test_duplicate_target_name(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        TARGET
        + """
        [[targets]]
        name = "repo"  # <-
        upstream = "http://127.0.0.1:9001"
        """,
    )
    assert issue.where == "targets[1].name"
    assert "duplicate" in issue.message and "repo" in issue.message


def test_bad_target_name(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[targets]]
        name = "has space"  # <-
        upstream = "http://127.0.0.1:9001"
        """,
    )
    assert issue.where == "targets[0].name"


# --- rules -------------------------------------------------------------------------------


def test_duplicate_rule_name(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[rules]]
        name = "same"
        action = "allow"

        [[rules]]
        name = "other"
        action = "allow"

        [[rules]]
        name = "same"  # <-
        action = "deny"
        """,
    )
    assert issue.where == "rules[2].name"
    assert "duplicate" in issue.message


def test_rule_with_unknown_target(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        TARGET
        + """
        [[rules]]
        name = "r"
        target = ["repo", "bulid"]  # <-
        action = "allow"
        """,
    )
    assert issue.where == "rules[0].target"
    assert "bulid" in issue.message


def test_rule_target_glob_is_not_checked_against_names(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[[rules]]\nname = "r"\ntarget = "re*"\naction = "allow"\n')
    )
    assert config.policy.rules[0].name == "r"


def test_rule_with_bad_glob(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[rules]]
        name = "r"
        action = "deny"
        path = ["/ok/**", "/bad/[abc"]  # <-
        """,
    )
    assert issue.where == "rules[0].path"
    assert "unclosed '['" in issue.message


def test_rule_with_bad_body_regex(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[rules]]
        name = "r"
        action = "deny"

        [[rules]]
        name = "s"
        body = '"branch"\\s*:\\s*("main"'  # <-
        action = "deny"
        """,
    )
    assert issue.where == "rules[1].body"
    assert "regular expression" in issue.message


def test_rule_with_unknown_matcher_field(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[rules]]
        name = "r"
        action = "deny"
        verb = "GET"  # <-
        """,
    )
    assert issue.where == "rules[0].verb"
    assert "unknown field 'verb'" in issue.message


@pytest.mark.parametrize("field", ["status", "decision", "rule"])
def test_rule_with_flow_only_field(tmp_path: Path, field: str) -> None:
    value = "404" if field == "status" else '"x"'
    issue = single_issue(
        tmp_path,
        f"""
        [[rules]]
        name = "r"
        action = "deny"
        {field} = {value}  # <-
        """,
    )
    assert issue.where == f"rules[0].{field}"
    assert "after the response" in issue.message


def test_rule_with_bad_action(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[rules]]
        name = "r"
        path = "/x"
        action = "permit"  # <-
        """,
    )
    assert issue.where == "rules[0].action"


def test_rule_without_action(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rules]]\nname = "r"\npath = "/x"\n')
    issue = issues_of(path)[0]
    assert issue.where == "rules[0].action"
    assert issue.line == 1  # the [[rules]] header: the nearest thing the file wrote


def test_rule_header_table_error_points_at_rule(tmp_path: Path) -> None:
    path = write(tmp_path, '[[rules]]\nname = "r"\naction = "deny"\nheader = "x"\n')
    issue = issues_of(path)[0]
    assert issue.where == "rules[0].header"
    assert issue.line == 4


@pytest.mark.parametrize("key", ["header.x-foo", "query.page"])
def test_rule_table_field_error_points_at_its_line(tmp_path: Path, key: str) -> None:
    single_issue(
        tmp_path,
        f"""
        [[rules]]
        name = "r"
        action = "deny"
        {key} = "[abc"  # <-
        """,
    )


# --- TOML syntax and identity ------------------------------------------------------------


def test_invalid_toml_is_reported_with_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nlisten = "127.0.0.1:8700"\nstate_dir = \n')
    issue = issues_of(path)[0]
    assert issue.file == str(path.absolute())
    assert issue.message.startswith("invalid TOML")
    assert issue.line == 3
    assert ":3:" in str(issue)


def test_invalid_toml_issue_carries_the_line(tmp_path: Path) -> None:
    single_issue(
        tmp_path,
        """
        [proxy]
        listen = "127.0.0.1:8700"
        state_dir =   # <-
        """,
    )


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[proxy]\nlisten = "127.0.0.1:1"\nlisten = "127.0.0.1:2"\n')
    assert issues_of(path)[0].message.startswith("invalid TOML")


def test_identity_none_refuses_non_loopback_listen(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [proxy]
        listen = "0.0.0.0:8700"  # <-
        admin_listen = "127.0.0.1:8701"

        [identity]
        mode = "none"
        """,
    )
    assert issue.where == "proxy.listen"
    assert "loopback" in issue.message and "0.0.0.0" in issue.message


def test_identity_none_refuses_non_loopback_target_listen(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[targets]]
        name = "repo"
        upstream = "http://127.0.0.1:9000"
        listen = "[::]:8702"  # <-
        """,
    )
    assert issue.where == "targets[0].listen"


def test_identity_local_may_listen_beyond_loopback(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[proxy]\nlisten = "0.0.0.0:8700"\n[identity]\nmode = "local"\n')
    )
    assert config.proxy.listen == "0.0.0.0:8700"


@pytest.mark.parametrize("listen", ["127.0.0.1:8700", "localhost:8700", "[::1]:8700"])
def test_identity_none_accepts_loopback(tmp_path: Path, listen: str) -> None:
    config = load_config(write(tmp_path, f'[proxy]\nlisten = "{listen}"\n'))
    assert config.proxy.listen == listen


@pytest.mark.parametrize("listen", ["8700", "127.0.0.1", "127.0.0.1:99999", "::1:8700"])
def test_bad_listen(tmp_path: Path, listen: str) -> None:
    issue = single_issue(tmp_path, f'[proxy]\nlisten = "{listen}"  # <-\n')
    assert issue.where == "proxy.listen"


# --- default path ------------------------------------------------------------------------


def test_default_config_path_prefers_local_file(tmp_path: Path) -> None:
    local = tmp_path / "sluice.toml"
    local.write_text("", encoding="utf-8")
    assert default_config_path(tmp_path) == local


def test_default_config_path_falls_back_to_sample(tmp_path: Path) -> None:
    assert default_config_path(tmp_path) == SAMPLE


def test_default_config_path_uses_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_config_path() == SAMPLE
    (tmp_path / "sluice.toml").write_text("", encoding="utf-8")
    assert default_config_path().resolve() == (tmp_path / "sluice.toml").resolve()


# --- line tracking through multi-line values ---------------------------------------------


def test_line_after_multiline_array_and_string(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        '''
        [[rules]]
        name = "creds"
        path = [
          "**/.env",
          "**/*.pem",
        ]
        reason = """
        not for agents
        colour = "looks like a key"
        [[rules]]
        """
        action = "deny"

        [[rules]]
        name = "second"
        action = "allow"
        reason = \'\'\'
        also = "not a key"
        \'\'\'
        colour = "blue"  # <-
        ''',
    )
    assert issue.where == "rules[1].colour"


def test_line_after_multiline_string_on_target(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        '''
        [[rules]]
        name = "a"
        action = "deny"
        reason = """first line
        [[targets]]
        name = "fake"
        """

        [[targets]]
        name = "repo"
        upstream = "http://127.0.0.1:9000"
        bogus = 1  # <-
        ''',
    )
    assert issue.where == "targets[0].bogus"


def test_line_after_single_line_string_holding_triple_quotes(tmp_path: Path) -> None:
    single_issue(
        tmp_path,
        """
        [[rules]]
        name = "docstrings"
        body = '\"\"\"'
        action = "deny"

        [[rules]]
        name = "second"
        action = "allow"
        colour = "blue"  # <-
        """,
    )


# --- credentials -------------------------------------------------------------------------


def test_target_with_unknown_credential(tmp_path: Path) -> None:
    issue = single_issue(
        tmp_path,
        """
        [[targets]]
        name = "repo"
        upstream = "http://127.0.0.1:9000"
        credential = "nope"  # <-
        """,
    )
    assert issue.where == "targets[0].credential"


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('kind = "jwt"\nkey_file = "k.pem"\nttl = "ten"  # <-\n', "credentials.build.ttl"),
        ('kind = "static"\nenv = "TOKEN"\nbogus = 1  # <-\n', "credentials.build.bogus"),
    ],
)
def test_credential_errors_point_at_their_key(tmp_path: Path, body: str, where: str) -> None:
    issue = single_issue(tmp_path, "[credentials.build]\n" + body)
    assert issue.where == where
