"""The matcher language: rule tables and console filter text over the same Facts."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wcmatch import glob

from proxy.filter_language import parse_filter
from proxy.matcher import (
    FIELDS,
    FLOW_ONLY_FIELDS,
    BodyNotLoaded,
    Facts,
    Matcher,
    MatcherError,
    compile_matcher,
    headers_for_facts,
)


def rule(**spec: object) -> Matcher:
    return compile_matcher(spec)


def facts(**kwargs: object) -> Facts:
    return Facts(**kwargs)  # type: ignore[arg-type]


# --- fields in rule tables ---------------------------------------------------------------


def test_empty_matcher_matches_everything() -> None:
    assert compile_matcher({}).matches(Facts())
    assert parse_filter("").matches(facts(method="DELETE", path="/x"))
    assert parse_filter("   ").matches(Facts())


def test_method_is_case_insensitive_both_ways() -> None:
    matcher = rule(method=["get", "Head"])
    assert matcher.matches(facts(method="GET"))
    assert matcher.matches(facts(method="get"))
    assert matcher.matches(facts(method="HEAD"))
    assert not matcher.matches(facts(method="POST"))
    assert rule(method="POST").matches(facts(method="post"))


def test_target_glob_and_missing_target() -> None:
    matcher = rule(target="re*")
    assert matcher.matches(facts(target="repo"))
    assert not matcher.matches(facts(target="build"))
    assert not matcher.matches(facts(target=None))
    assert not rule(target="repo").matches(facts(target="Repo"))  # names are case-sensitive


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/api/*", "/api/push", True),
        ("/api/*", "/api/push/x", False),  # * stays in one segment
        ("/api/*", "/api/", False),
        ("/api/**", "/api/push/x/y", True),  # ** spans segments
        ("/api/**", "/api/", True),
        ("**/.env", "/.env", True),
        ("**/.env", "/a/b/.env", True),
        ("**/.env", "/a/b/.envrc", False),
        ("**/*.pem", "/certs/server.pem", True),
        ("**/.ssh/**", "/home/u/.ssh/id_rsa", True),
        ("/a/**/b", "/a/b", True),
        ("/a/**/b", "/a/x/y/b", True),
        ("api/push", "/api/push", True),  # a leading slash is implied
        ("api/*", "/api/x", True),
        ("/files/?.txt", "/files/a.txt", True),
        ("/files/?.txt", "/files/ab.txt", False),
        ("/files/[ab].txt", "/files/b.txt", True),
        ("/files/[ab].txt", "/files/c.txt", False),
        ("/*", "/.hidden", True),  # dot files are not special
        ("/API/*", "/api/x", False),  # paths are case-sensitive
    ],
)
def test_path_globs(pattern: str, path: str, expected: bool) -> None:
    assert rule(path=pattern).matches(facts(path=path)) is expected


def test_path_list_is_any_of() -> None:
    matcher = rule(path=["/a", "/b/**"])
    assert matcher.matches(facts(path="/a"))
    assert matcher.matches(facts(path="/b/c/d"))
    assert not matcher.matches(facts(path="/c"))


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.Example.COM", True),
        ("api.example.com", "api.example.com:8443", True),
        ("*.example.com", "git.example.com:80", True),
        ("*.example.com", "example.com", False),
        ("127.0.0.1", "127.0.0.1:9000", True),
        ("::1", "[::1]:9000", True),
        ("::1", "[::1]", True),
        ("EXAMPLE.com", "example.com", True),
    ],
)
def test_host(pattern: str, host: str, expected: bool) -> None:
    assert rule(host=pattern).matches(facts(host=host)) is expected


def test_query_as_glob_over_the_raw_string() -> None:
    matcher = rule(query="*force=true*")
    assert matcher.matches(facts(query="a=1&force=true"))
    assert not matcher.matches(facts(query="a=1"))
    empty = rule(query="")  # exactly no query string (learned rules write this)
    assert empty.matches(facts(query=""))
    assert not empty.matches(facts(query="a=1"))


def test_query_as_table_of_params() -> None:
    matcher = rule(query={"page": "2*", "sort": ["asc", "desc"]})
    assert matcher.matches(facts(query="page=20&sort=asc"))
    assert matcher.matches(facts(query="sort=desc&x=1&page=2"))
    assert not matcher.matches(facts(query="page=20"))  # every listed param must be present
    assert not matcher.matches(facts(query="page=3&sort=asc"))
    assert matcher.matches(facts(query="page=9&page=21&sort=asc"))  # any repeated value
    assert rule(query={"q": "a b"}).matches(facts(query="q=a+b"))  # decoded before matching


def test_header_globs() -> None:
    matcher = rule(header={"X-Api-Version": "2*", "user-agent": "curl/*"})
    headers = headers_for_facts([("X-API-Version", "2.1"), ("User-Agent", "curl/8.0")])
    assert matcher.matches(facts(headers=headers))
    assert not matcher.matches(facts(headers={"x-api-version": "2.1"}))  # both must hold
    assert not matcher.matches(
        facts(headers=headers_for_facts([("x-api-version", "1"), ("user-agent", "curl/8")]))
    )
    assert not rule(header={"x-foo": "bar"}).matches(facts(headers={"x-foo": "BAR"}))


def test_headers_for_facts_folds_repeats() -> None:
    assert headers_for_facts([("Accept", "a"), ("ACCEPT", "b"), ("X", "1")]) == {
        "accept": "a, b",
        "x": "1",
    }


def test_header_field_requires_a_table() -> None:
    with pytest.raises(MatcherError) as info:
        rule(header="x-foo")
    assert info.value.field == "header"


def test_subject() -> None:
    matcher = rule(subject="agent-*")
    assert matcher.matches(facts(subject="agent-7"))
    assert not matcher.matches(facts(subject="human"))
    assert not matcher.matches(facts(subject=None))


def test_groups_any_of() -> None:
    matcher = rule(groups=["admins", "ops"])
    assert matcher.matches(facts(groups=("devs", "ops")))
    assert not matcher.matches(facts(groups=("devs",)))
    assert not matcher.matches(facts(groups=()))
    assert rule(groups="devs").matches(facts(groups=("devs",)))


@pytest.mark.parametrize(
    ("pattern", "content_type", "expected"),
    [
        ("application/json", "application/json; charset=utf-8", True),
        ("application/json", "Application/JSON", True),
        ("application/*", "application/x-www-form-urlencoded;charset=x", True),
        ("text/*", "application/json", False),
        ("application/json", "", False),
    ],
)
def test_content_type_ignores_parameters(pattern: str, content_type: str, expected: bool) -> None:
    assert rule(content_type=pattern).matches(facts(content_type=content_type)) is expected


def test_body_regex_and_body_not_loaded() -> None:
    matcher = rule(method="POST", body=r'"branch"\s*:\s*"main"')
    assert matcher.needs_body
    push = facts(method="POST")
    assert matcher.matches_head(push)
    with pytest.raises(BodyNotLoaded):
        matcher.matches(push)
    assert matcher.matches(dataclasses.replace(push, body=b'{"branch" : "main"}'))
    assert not matcher.matches(dataclasses.replace(push, body=b'{"branch": "dev"}'))
    # A head mismatch never asks for the body.
    assert not matcher.matches(facts(method="GET"))
    assert not rule(method="GET").needs_body


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"path": []}, "path"),
        ({"path": [1]}, "path"),
        ({"path": "  "}, "path"),
        ({"method": 5}, "method"),
        ({"path": "/a\x00"}, "path"),
        ({"path": "/a/[bc"}, "path"),
        ({"host": "[x"}, "host"),
        ({"body": "("}, "body"),
        ({"body": ""}, "body"),
        ({"verb": "GET"}, "verb"),
        ({"query": {"page": "[1"}}, "query.page"),
    ],
)
def test_compile_errors_name_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(MatcherError) as info:
        compile_matcher(spec)
    assert info.value.field == field


@pytest.mark.parametrize("name", sorted(FLOW_ONLY_FIELDS))
def test_flow_only_fields_refused_for_policy(name: str) -> None:
    value = 404 if name == "status" else "x"
    with pytest.raises(MatcherError) as info:
        compile_matcher({name: value})
    assert info.value.field == name
    assert compile_matcher({name: value}, for_policy=False).fields == (name,)


def test_status_decision_rule_in_non_policy_tables() -> None:
    matcher = compile_matcher(
        {"status": ["4xx", ">=500"], "decision": "Denied", "rule": "push-*"}, for_policy=False
    )
    assert matcher.matches(facts(status=403, decision="denied", rule="push-to-main"))
    assert matcher.matches(facts(status=502, decision="DENIED", rule="push-x"))
    assert not matcher.matches(facts(status=200, decision="denied", rule="push-x"))
    assert not matcher.matches(facts(status=None, decision="denied", rule="push-x"))
    assert compile_matcher({"status": 404}, for_policy=False).matches(facts(status=404))


# --- filter text -------------------------------------------------------------------------


def test_filter_method_alternatives() -> None:
    matcher = parse_filter("method:POST,PUT")
    assert matcher.matches(facts(method="POST"))
    assert matcher.matches(facts(method="put"))
    assert not matcher.matches(facts(method="GET"))
    assert matcher.fields == ("method",)


def test_filter_negation() -> None:
    matcher = parse_filter("!decision:allowed")
    assert matcher.matches(facts(decision="denied"))
    assert matcher.matches(facts(decision=None))
    assert not matcher.matches(facts(decision="allowed"))


@pytest.mark.parametrize(
    ("term", "hits", "misses"),
    [
        ("status:4xx", [400, 404, 499], [200, 500, 399]),
        ("status:>=400", [400, 503], [399, 200]),
        ("status:<300", [200, 204], [300, 404]),
        ("status:>499", [500], [499]),
        ("status:<=404", [404, 200], [405]),
        ("status:400-499", [400, 450, 499], [399, 500]),
        ("status:404", [404], [403]),
        ("status:=404", [404], [403]),
        ("status:404,5xx", [404, 500, 502], [403, 200]),
    ],
)
def test_filter_status(term: str, hits: list[int], misses: list[int]) -> None:
    matcher = parse_filter(term)
    for status in hits:
        assert matcher.matches(facts(status=status)), (term, status)
    for status in misses:
        assert not matcher.matches(facts(status=status)), (term, status)
    assert not matcher.matches(facts(status=None))


def test_filter_header_and_query_params() -> None:
    header = parse_filter("header.x-foo:bar*")
    assert header.matches(facts(headers={"x-foo": "barbaz"}))
    assert not header.matches(facts(headers={"x-foo": "baz"}))
    assert not header.matches(facts(headers={}))
    assert parse_filter("header.X-Foo:bar").matches(facts(headers={"x-foo": "bar"}))

    query = parse_filter("query.page:2")
    assert query.matches(facts(query="page=2&x=1"))
    assert not query.matches(facts(query="page=3"))
    assert parse_filter("query.page:2,3").matches(facts(query="page=3"))
    assert parse_filter("query:*debug*").matches(facts(query="a=1&debug=1"))


def test_filter_bare_word_searches_paths() -> None:
    matcher = parse_filter("push")
    assert matcher.matches(facts(path="/api/push"))
    assert matcher.matches(facts(path="/api/pushed"))
    assert not matcher.matches(facts(path="/api/pull"))
    assert parse_filter(".env").matches(facts(path="/app/.env.local"))


def test_filter_bare_word_is_literal() -> None:
    matcher = parse_filter("a*b")
    assert matcher.matches(facts(path="/x/a*b"))
    assert not matcher.matches(facts(path="/x/aXb"))


@pytest.mark.parametrize(("word", "path"), [("api", "/v1/api/push"), ("/api", "/api/push")])
def test_filter_bare_word_finds_any_segment(word: str, path: str) -> None:
    assert parse_filter(word).matches(facts(path=path))


def test_filter_quoted_values() -> None:
    matcher = parse_filter('path:"/my docs/**" header.user-agent:"curl/*"')
    hit = facts(path="/my docs/a/b", headers={"user-agent": "curl/8.1"})
    assert matcher.matches(hit)
    assert not matcher.matches(dataclasses.replace(hit, path="/my/docs"))
    assert parse_filter("'host:*.example.com'").matches(facts(host="a.example.com:443"))


def test_filter_combines_terms_with_and() -> None:
    matcher = parse_filter("method:POST path:/api/** !decision:allowed status:>=400")
    hit = facts(method="POST", path="/api/push", decision="denied", status=403)
    assert matcher.matches(hit)
    assert not matcher.matches(dataclasses.replace(hit, method="GET"))
    assert not matcher.matches(dataclasses.replace(hit, decision="allowed"))
    assert not matcher.matches(dataclasses.replace(hit, status=200))
    assert not matcher.matches(dataclasses.replace(hit, path="/other"))


def test_filter_field_names_are_case_insensitive_and_accept_equals() -> None:
    assert parse_filter("METHOD:get").matches(facts(method="GET"))
    assert parse_filter("method=GET").matches(facts(method="GET"))


def test_filter_body_and_negated_body() -> None:
    matcher = parse_filter("body:secret")
    assert matcher.needs_body and not matcher.body_negated
    assert matcher.matches(facts(body=b"a secret"))
    with pytest.raises(BodyNotLoaded):
        matcher.matches(Facts())
    negated = parse_filter("!body:secret")
    assert negated.body_negated
    assert negated.matches(facts(body=b"plain"))
    assert not negated.matches(facts(body=b"a secret"))


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("method:GET status:bogus", "status:bogus"),
        ("path:/a/**  nope:1", "nope:1"),
        ("method:GET !status:4x", "!status:4x"),
        ("host:a path:/[x", "path:/[x"),
        ("body:( method:GET", "body:("),
        ("status:600-ab", "status:600-ab"),
    ],
)
def test_filter_error_position_points_at_the_bad_term(text: str, bad: str) -> None:
    with pytest.raises(MatcherError) as info:
        parse_filter(text)
    assert info.value.position == text.index(bad), (text, info.value.position)


def test_filter_unbalanced_quotes() -> None:
    with pytest.raises(MatcherError) as info:
        parse_filter('path:"/a')
    assert info.value.position == 5  # the opening quote that is never closed
    assert "quote" in info.value.message


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ('method:GET status:"bad value"', 11),
        ("path:/status:x status:x", 15),
    ],
)
def test_filter_error_position_with_quotes_and_repeats(text: str, position: int) -> None:
    with pytest.raises(MatcherError) as info:
        parse_filter(text)
    assert info.value.position == position


# --- the glob engine agrees with wcmatch -------------------------------------------------

SEGMENT = st.text(alphabet="ab.", max_size=3)
PATHS = st.lists(SEGMENT, max_size=4).map(lambda parts: "/" + "/".join(parts))
GLOB_TOKEN = st.sampled_from(["a", "b", ".", "*", "?", "**", "[ab]", "[!a]"])
GLOB_SEGMENT = st.lists(GLOB_TOKEN, min_size=1, max_size=3).map("".join)
GLOBS = st.tuples(st.booleans(), st.lists(GLOB_SEGMENT, min_size=1, max_size=4)).map(
    lambda parts: ("/" if parts[0] else "") + "/".join(parts[1])
)
WCMATCH_FLAGS = glob.GLOBSTAR | glob.DOTGLOB


def normalised(pattern: str) -> str:
    return pattern if pattern.startswith(("/", "**")) else "/" + pattern


@settings(max_examples=400, deadline=None, database=None)
@given(path=PATHS, pattern=GLOBS)
def test_path_glob_agrees_with_wcmatch(path: str, pattern: str) -> None:
    ours = compile_matcher({"path": pattern}).matches(Facts(path=path))
    reference = glob.globmatch(path, normalised(pattern), flags=WCMATCH_FLAGS)
    assert ours is reference


@settings(max_examples=200, deadline=None, database=None)
@given(path=PATHS, pattern=GLOBS)
def test_path_in_rule_and_filter_agree(path: str, pattern: str) -> None:
    sample = Facts(path=path)
    assert compile_matcher({"path": pattern}).matches(sample) is parse_filter(
        f"path:{pattern}"
    ).matches(sample)


# --- one language: a rule table and filter text agree ------------------------------------

SAMPLES = [
    Facts(),
    facts(method="GET", target="repo", path="/files/README.md", host="repo.local:9000"),
    facts(method="post", target="repo", path="/api/push", query="force=1&page=2"),
    facts(method="PUT", target="build", path="/api/builds/7/log", subject="agent-1"),
    facts(method="DELETE", target="build", path="/a/.env", host="API.example.com"),
    facts(
        method="GET",
        target="repo",
        path="/x",
        headers={"x-api-version": "2.3", "user-agent": "curl/8"},
        content_type="application/json; charset=utf-8",
        subject="human",
    ),
    facts(method="PATCH", path="/deep/a/b/c.pem", query="page=20", content_type="text/plain"),
    facts(method="GET", path="/my docs/notes.txt"),
]

PARITY = [
    ({"method": ["POST", "PUT"]}, "method:POST,PUT"),
    ({"method": "get"}, "method:get"),
    ({"target": "re*"}, "target:re*"),
    ({"target": ["repo", "build"]}, "target:repo,build"),
    ({"path": "/api/**"}, "path:/api/**"),
    ({"path": "**/.env"}, "path:**/.env"),
    ({"path": "api/*"}, "path:api/*"),
    ({"path": ["**/*.pem", "/x"]}, "path:**/*.pem,/x"),
    ({"host": "*.example.com"}, "host:*.example.com"),
    ({"host": "repo.local"}, "host:repo.local"),
    ({"query": "*page=2*"}, "query:*page=2*"),
    ({"query": {"page": "2*"}}, "query.page:2*"),
    ({"header": {"x-api-version": "2*"}}, "header.x-api-version:2*"),
    ({"subject": "agent-*"}, "subject:agent-*"),
    ({"content_type": "application/json"}, "content_type:application/json"),
    ({"method": "GET", "target": "repo"}, "method:GET target:repo"),
    ({"path": "/my docs/**"}, 'path:"/my docs/**"'),
]


@pytest.mark.parametrize(("spec", "text"), PARITY, ids=[text for _, text in PARITY])
def test_rule_table_and_filter_text_agree(spec: dict[str, object], text: str) -> None:
    from_rule = compile_matcher(spec)
    from_filter = parse_filter(text)
    answers = [from_rule.matches(sample) for sample in SAMPLES]
    assert answers == [from_filter.matches(sample) for sample in SAMPLES]
    assert any(answers), "the sample set should hit every parity case at least once"


def test_body_rule_and_filter_agree() -> None:
    sample = facts(body=b'{"branch": "main"}')
    assert compile_matcher({"body": "main"}).matches(sample)
    assert parse_filter("body:main").matches(sample)
    assert not compile_matcher({"body": "dev"}).matches(sample)
    assert not parse_filter("body:dev").matches(sample)


def test_every_field_is_documented_in_the_error() -> None:
    with pytest.raises(MatcherError) as info:
        compile_matcher({"nope": "x"})
    for name in FIELDS:
        assert name in info.value.message


def test_a_host_glob_spelled_as_an_address_matches_addresses_not_names() -> None:
    lan = rule(host=["10.*"])
    assert lan.matches(facts(host="10.0.0.7"))
    assert lan.matches(facts(host="10.0.0.7:8443"))
    assert not lan.matches(facts(host="10.attacker.com"))
    assert not lan.matches(facts(host="10.0.0.7.nip.io"))
    assert rule(host=["*"]).matches(facts(host="10.attacker.com"))
    assert rule(host=["*.example.com"]).matches(facts(host="API.example.com"))
    assert parse_filter("host:10.*").matches(facts(host="10.1.1.1"))
    assert not parse_filter("host:10.*").matches(facts(host="10.evil.test"))
