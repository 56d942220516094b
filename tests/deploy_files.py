"""Reading deployment files as their tools read them: a Dockerfile's instructions, a
``.dockerignore``'s patterns, and an env file as ``docker run --env-file`` takes it. Written
from the tools' documented rules, for tests/test_deploy.py (no Docker engine runs here)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY ...
    args: str  # the rest, continuation lines joined
    line: int  # where it starts, 1-based

    def exec_form(self) -> list[str] | None:
        """The JSON array of ``CMD ["a", "b"]`` (exec form), None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value

    def flags(self) -> tuple[dict[str, str], str]:
        """``--name=value`` options before the arguments, and the arguments."""
        options: dict[str, str] = {}
        rest = self.args.strip()
        while rest.startswith("--"):
            option, _, rest = rest.partition(" ")
            name, _, value = option[2:].partition("=")
            options[name] = value
            rest = rest.lstrip()
        return options, rest


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions by stage. Comments and blank lines go; a line ending in a backslash goes on
    with the next one (comment lines inside a continued instruction are dropped, as Docker does)."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "FROM":
            _, rest = instruction.flags()
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"line {number}: {keyword} before FROM"
            stages[-1].instructions.append(instruction)
    assert not pending, "the Dockerfile ends with a continued line"
    return stages


def env_pairs(args: str) -> list[tuple[str, str]]:
    """``ENV A=1 B="two words"`` as pairs (the legacy ``ENV A 1`` form too)."""
    if "=" not in args.split(" ", 1)[0]:
        name, _, value = args.partition(" ")
        return [(name, value.strip())]
    pairs = []
    for token in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\'[^\']*\'|\S+)', args):
        name, value = token
        if value[:1] in "\"'":
            value = value[1:-1]
        pairs.append((name, value))
    return pairs


def substitute(value: str, env: dict[str, str]) -> str:
    """Docker's ``$NAME`` and ``${NAME}`` in ENV, WORKDIR, COPY ... (unset: empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


# --- .dockerignore ---------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A Go ``filepath.Match`` pattern with ``**`` (any number of folders), as Docker uses."""
    out = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            if body.startswith("^"):
                body = "!" + body[1:]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


class DockerIgnore:
    """Which files of the build context Docker leaves out: the last pattern that matches the
    path, or one of its parent folders, decides; ``!pattern`` brings a path back."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            keep = line.startswith("!")
            pattern = line[1:].strip() if keep else line
            pattern = re.sub(r"/+", "/", pattern).strip("/")  # filepath.Clean, no leading /
            if pattern.startswith("./"):
                pattern = pattern[2:]
            self.rules.append((keep, _pattern_regex(pattern)))

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for keep, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                verdict = not keep
        return verdict


# --- env files -------------------------------------------------------------------------------

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def docker_env_file(text: str) -> dict[str, str]:
    """What ``docker run --env-file`` sets: per line, leading blanks dropped; empty lines and
    lines starting with ``#`` skipped; ``NAME=value`` with the value taken literally (quotes and
    everything after the ``=`` kept, nothing trimmed); a line without ``=`` would copy the
    variable from the caller's environment, which an example file must not rely on."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        name, has_value, value = line.partition("=")
        name = name.lstrip()
        assert has_value, (
            f"line {number}: {line!r} has no '=' (Docker would copy it from the environment)"
        )
        assert name and not re.search(r"\s", name), f"line {number}: name {name!r} has blanks"
        values[name] = value
    return values


def proxy_variable_names(settings_source: str) -> set[str]:
    """Every upper-case name the settings module reads (its string literals)."""
    return set(re.findall(r'"([A-Z][A-Z0-9_]{1,})"', settings_source))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")
