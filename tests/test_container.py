"""The Apptainer image as far as it can be checked without Apptainer (which cannot be installed here).

The definition is parsed and its shell sections checked with ``bash -n`` and ``sh -n``; its pinned
versions are compared with pyproject.toml, containers/constraints.txt and the README; the arch-trimming
step runs on the real mamba-ssm and causal-conv1d source packages (downloaded once into
~/.cache/brainmt-test-sdists) and each patched setup.py is executed to see which -gencode flags reach the
CUDA extension; the self-test runs on the CPU path; containers/exec.sh and containers/build.sh run
against stand-in runtimes that record their command lines.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

from brainmt.launch.container import exec_command

ROOT = Path(__file__).resolve().parents[1]
DEFINITION = ROOT / "Apptainer.def"
FAKE_APPTAINER = ROOT / "tests" / "fake_apptainer.sh"
REQUIRED_SECTIONS = {"arguments", "labels", "help", "files", "post", "environment", "runscript", "test"}
SHELL_SECTIONS = ("post", "environment", "test", "runscript")
TEMPLATE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
BASE_IMAGE = re.compile(r"^pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-devel$")
# what the unpatched setup.py files compile, by nvcc release (the list that trim_arch.py replaces)
UPSTREAM_SM = {"12.8": ["75", "80", "87", "90", "100", "120"],
               "13.0": ["75", "80", "87", "90", "100", "120", "103", "110", "121"]}


def _trim_arch():
    """containers/trim_arch.py as a module (it is a script: standard library only, run in the image)."""
    spec = importlib.util.spec_from_file_location("trim_arch", ROOT / "containers" / "trim_arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


trim_arch = _trim_arch()


def parse_definition(text: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(header as ordered (key, value) pairs, {section name: body}); AssertionError on a malformed file."""
    header: list[tuple[str, str]] = []
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            assert current not in sections, f"section %{current} appears twice"
            sections[current] = ""
        elif current is None:
            if line.strip() and not line.lstrip().startswith("#"):
                key, sep, value = line.partition(":")
                assert sep and key.strip() and value.strip(), f"header line is not 'Key: value': {line!r}"
                header.append((key.strip(), value.strip()))
        else:
            sections[current] += line + "\n"
    return header, sections


def definition() -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(header, sections, %arguments defaults) of Apptainer.def."""
    header, sections = parse_definition(DEFINITION.read_text())
    arguments = {}
    for line in sections["arguments"].splitlines():
        if line.strip() and not line.strip().startswith("#"):
            name, sep, default = line.strip().partition("=")
            assert sep and default, f"%arguments line without a default: {line!r}"
            arguments[name.strip()] = default.strip()
    return dict(header), sections, arguments


def labels() -> dict[str, str]:
    """%labels as {name: value}."""
    _, sections, _ = definition()
    return dict(line.strip().split(None, 1) for line in sections["labels"].splitlines() if line.strip())


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def readme_section() -> str:
    """The README's "Building the container" section."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Building the container")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_definition_parses_with_defaults_for_every_argument_and_valid_shell(tmp_path):
    text = DEFINITION.read_text()
    header, sections = parse_definition(text)
    assert header[0] == ("Bootstrap", "docker") and dict(header).get("From"), header
    first = next(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    assert first == "Bootstrap: docker"
    assert REQUIRED_SECTIONS <= set(sections), REQUIRED_SECTIONS - set(sections)
    _, _, arguments = definition()
    used = set(TEMPLATE.findall(text))
    assert used - set(arguments) == set(), f"{{{{ }}}} without a default in %arguments: {used - set(arguments)}"
    assert set(arguments) - used == set(), f"%arguments never used: {set(arguments) - used}"
    assert re.search(r"(?m)^\s*max_jobs=\d+$", sections["arguments"])
    trim_arch.parse_archs(arguments["cuda_arch"])                      # the default is a valid architecture list
    substituted = parse_definition(TEMPLATE.sub(lambda m: arguments[m.group(1)], text))[1]
    for name in SHELL_SECTIONS:   # Apptainer runs them with /bin/sh: POSIX, as checked by sh (dash here)
        script = tmp_path / f"{name}.sh"
        script.write_text(substituted[name])
        for shell in ("bash", "sh"):
            proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, f"%{name} under {shell} -n: {proc.stderr}"
    for line in sections["files"].splitlines():   # build.sh builds from the repository root
        if line.strip():
            source = line.split()[0]
            assert (ROOT / source).exists(), f"%files source {source} is missing"
            assert not source.startswith("containers") or source.endswith((".py", ".txt")), \
                f"{source}: copy single files from containers/, where built .sif images live"


def test_post_builds_the_kernels_for_the_requested_architectures_without_caches():
    _, sections, _ = definition()
    post = sections["post"]
    install = post.index("MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=\"{{ max_jobs }}\"")
    assert post.index('trim_arch.py" --arch "{{ cuda_arch }}"') < install < post.index('-c "$PIN" "$SRC"')
    pip_calls = re.findall(r"pip (?:install|download)[^\n]*", post.replace("\\\n", " "))
    assert len(pip_calls) >= 5 and all("--no-cache-dir" in call for call in pip_calls), pip_calls
    assert "--no-build-isolation" in post[install:install + 300]
    assert re.search(r'rm -rf "\$BUILD" "\$SRC"', post)
    assert sections["runscript"].split() == ["exec", "brainmt", '"$@"']
    assert "brainmt.selftest" in sections["test"]


def test_pinned_versions_agree_with_pyproject_constraints_and_readme():
    project = pyproject()["project"]
    header, sections, _ = definition()
    label = labels()
    gpu = {canonicalize_name(Requirement(r).name): str(Requirement(r).specifier).lstrip("=")
           for r in project["optional-dependencies"]["gpu"]}
    assert set(gpu) == {"mamba-ssm", "causal-conv1d"}
    assert f"MAMBA_VERSION={gpu['mamba-ssm']}\n" in sections["post"]
    assert f"CAUSAL_CONV1D_VERSION={gpu['causal-conv1d']}\n" in sections["post"]
    assert label["mamba-ssm.version"] == gpu["mamba-ssm"] and label["causal-conv1d.version"] == gpu["causal-conv1d"]
    assert label["brainmt.version"] == project["version"]

    m = BASE_IMAGE.match(header["From"])
    assert m, f"From: {header['From']} is not a pinned pytorch/pytorch devel tag"
    torch_version, cuda, cudnn = m.groups()
    assert label["base.image"] == header["From"]
    assert (label["torch.version"], label["cuda.version"], label["cudnn.version"]) == (torch_version, cuda, cudnn)
    assert f"assert v == '{torch_version}'" in sections["post"] and f"release {cuda}" in sections["post"]

    pins = {}
    for line in (ROOT / "containers" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            assert str(req.specifier).startswith("==") and len(req.specifier) == 1, f"not an exact pin: {line}"
            pins[canonicalize_name(req.name)] = str(req.specifier)[2:]
    assert pins["torch"] == torch_version
    for dependency in project["dependencies"]:
        req = Requirement(dependency)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} (pyproject.toml) is not pinned in containers/constraints.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {dependency}"

    section = readme_section()
    for value in (header["From"], torch_version, f"CUDA {cuda}", gpu["mamba-ssm"], gpu["causal-conv1d"]):
        assert value in section, f"the README's container section does not name {value}"


def test_environment_gives_each_job_a_local_triton_cache_and_the_slurm_thread_count(tmp_path):
    _, sections, _ = definition()
    script = tmp_path / "environment.sh"
    script.write_text(sections["environment"] + 'printf "%s|%s|%s|%s\\n" "$TRITON_CACHE_DIR" "${OMP_NUM_THREADS:-unset}" '
                      '"$PYTHONNOUSERSITE" "${MKL_NUM_THREADS:-unset}"\n')
    base = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path)}
    uid = os.getuid()

    def run(**env: str) -> list[str]:
        proc = subprocess.run(["sh", str(script)], env={**base, **env}, capture_output=True, text=True, check=True)
        return proc.stdout.strip().split("|")

    assert run(SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="6", SLURM_TMPDIR="/local/job") == \
        [f"/local/job/triton-{uid}-4242", "6", "1", "6"]
    assert run(SLURM_JOB_ID="4243", SLURM_CPUS_PER_TASK="6", OMP_NUM_THREADS="2")[:2] == \
        [f"{tmp_path}/triton-{uid}-4243", "2"]
    cache, threads, _, _ = run()
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/triton-{uid}-\d+", cache) and threads == "unset"


def test_runscript_passes_its_arguments_to_brainmt(tmp_path):
    _, sections, _ = definition()
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "brainmt"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "<%s>" "$a"; done\n')
    fake.chmod(0o755)
    script = tmp_path / "runscript.sh"
    script.write_text(sections["runscript"])
    proc = subprocess.run(["sh", str(script), "train", "--run-dir", "a dir", "model.embed_dim=64"], capture_output=True,
                          text=True, env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}, check=True)
    assert proc.stdout == "<train><--run-dir><a dir><model.embed_dim=64>"


@pytest.fixture(scope="module")
def sdists() -> dict[str, Path]:
    """The real mamba-ssm and causal-conv1d source packages of pyproject's gpu extra, downloaded once and cached."""
    pins = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["gpu"]]
    files = {canonicalize_name(r.name): f"{r.name.replace('-', '_')}-{str(r.specifier)[2:]}.tar.gz" for r in pins}
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brainmt-test-sdists"
    if not all((cache / name).exists() for name in files.values()):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download:
            # their setup.py imports torch and, unless told to skip, looks for nvcc even to report metadata
            env = {**os.environ, "MAMBA_SKIP_CUDA_BUILD": "TRUE", "CAUSAL_CONV1D_SKIP_CUDA_BUILD": "TRUE"}
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                                   "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", download,
                                   *[str(r) for r in pins]], capture_output=True, text=True, env=env, timeout=600)
            assert proc.returncode == 0, f"pip download failed:\n{proc.stdout}\n{proc.stderr}"
            for name in files.values():
                os.replace(Path(download) / name, cache / name)
    return {dist: cache / name for dist, name in files.items()}


def _unpack(sdist: Path, dest: Path) -> Path:
    """Unpack a source package; return its setup.py."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    return dest / sdist.name.removesuffix(".tar.gz") / "setup.py"


def _sm(gencodes: list[str]) -> list[str]:
    """arch=compute_80,code=sm_80 -> 80."""
    return [re.fullmatch(r"arch=compute_(\w+),code=sm_\1", g).group(1) for g in gencodes]


def test_trim_arch_leaves_exactly_the_requested_gencode_flags_in_the_real_setup_py(sdists, tmp_path):
    _, _, arguments = definition()
    setups = [_unpack(sdist, tmp_path) for sdist in sdists.values()]
    for setup_py in setups:
        for nvcc, expected in UPSTREAM_SM.items():   # the evaluation sees the hard-coded list...
            assert [_sm(flags) for flags in trim_arch.gencode_flags(setup_py, nvcc)] == [expected], (setup_py, nvcc)
    proc = subprocess.run([sys.executable, str(ROOT / "containers" / "trim_arch.py"), "--arch", arguments["cuda_arch"],
                           "--nvcc-version", "12.8", *map(str, setups)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("compiles sm_80 sm_90 (nvcc 12.8)") == 2, proc.stdout
    for setup_py in setups:
        for nvcc in UPSTREAM_SM:                     # ...and after trimming only the %arguments default remains
            assert trim_arch.gencode_flags(setup_py, nvcc) == [trim_arch.parse_archs(arguments["cuda_arch"])]
            assert [_sm(flags) for flags in trim_arch.gencode_flags(setup_py, nvcc)] == [["80", "90"]]
    proc = subprocess.run([sys.executable, str(ROOT / "containers" / "trim_arch.py"), "--arch", "9.0",
                           "--nvcc-version", "12.8", str(setups[0])], capture_output=True, text=True)
    assert proc.returncode == 1 and "already trimmed" in proc.stderr


def test_trim_arch_other_architectures_and_loud_failures(sdists, tmp_path):
    setup_py = _unpack(sdists["causal-conv1d"], tmp_path)
    original = setup_py.read_text()
    assert trim_arch.parse_archs("9.0 10.0;9.0+PTX") == [
        "arch=compute_90,code=sm_90", "arch=compute_100,code=sm_100", "arch=compute_90,code=compute_90"]
    setup_py.write_text(trim_arch.trim_setup(original, trim_arch.parse_archs("9.0+PTX,10.0")))
    assert trim_arch.gencode_flags(setup_py, "13.0") == [
        ["arch=compute_90,code=sm_90", "arch=compute_90,code=compute_90", "arch=compute_100,code=sm_100"]]
    for bad in ("sm_80", "8", "", "8.0,x"):
        with pytest.raises(ValueError):
            trim_arch.parse_archs(bad)
    with pytest.raises(ValueError, match="HACK: The compiler flag"):
        trim_arch.trim_setup(original.replace("# HACK:", "# Note:"), trim_arch.parse_archs("8.0"))
    moved = original.replace('        cc_flag.append("arch=compute_121,code=sm_121")\n', "").replace(
        "    if FORCE_CXX11_ABI:", '    if FORCE_CXX11_ABI:\n        cc_flag.append("arch=compute_121,code=sm_121")')
    with pytest.raises(ValueError, match="are not all before"):
        trim_arch.trim_setup(moved, trim_arch.parse_archs("8.0"))
    setup_py.write_text(original.replace("# HACK:", "# Note:"))
    proc = subprocess.run([sys.executable, str(ROOT / "containers" / "trim_arch.py"), "--arch", "8.0",
                           "--nvcc-version", "12.8", str(setup_py)], capture_output=True, text=True)
    assert proc.returncode == 1 and "exactly once, found it 0 times" in proc.stderr and setup_py.read_text() != ""


def test_selftest_passes_on_the_cpu_path_and_fails_loudly():
    proc = subprocess.run([sys.executable, "-m", "brainmt.selftest", "--device", "cpu"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   training step on the CPU path" in proc.stdout and "torch: " in proc.stdout
    assert "selftest passed on the CPU (pure-PyTorch scan) path" in proc.stdout

    import torch

    from brainmt.selftest import run

    lines: list[str] = []
    if not torch.cuda.is_available():
        assert run("cuda", out=lines.append) == 1 and lines[-1].startswith("FAIL device: --device cuda")
    if importlib.util.find_spec("selective_scan_cuda") is None:
        assert run("cpu", require_kernels=True, out=lines.append) == 1
        assert any(line.startswith("FAIL compiled kernels import: ModuleNotFoundError") for line in lines), lines
        assert lines[-1].startswith("selftest FAILED") and any(line.startswith("ok   training step") for line in lines)


def _fake_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "BRAINMT_CONTAINER_RUNTIME": str(FAKE_APPTAINER), "FAKE_APPTAINER_LOG": str(tmp_path / "calls.log"),
            "FAKE_APPTAINER_PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **extra}


def test_exec_sh_writes_the_launchers_command_line_with_the_profiles_binds(tmp_path):
    image = tmp_path / "brainmt.sif"
    image.write_text("stand-in image")
    (tmp_path / "base.yaml").write_text("cluster:\n  binds: ['/scratch:/scratch']\n")
    profile = tmp_path / "site.yaml"
    profile.write_text("base: base.yaml\ncluster:\n  partition: gpu\n  binds: ['/data:/data:ro', '/scratch:/scratch']\n")
    env = _fake_env(tmp_path, BRAINMT_BINDS="/home/lab:/lab,/opt/x")
    args = ["info", "--config", "debug", "--params-only"]
    proc = subprocess.run(["bash", str(ROOT / "containers" / "exec.sh"), "--image", str(image), "--bind", "/tmp",
                           "--profile", str(profile), "--", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "total" in proc.stdout                  # brainmt ran (the stand-in runs the command on the host)
    read_profile, run = (tmp_path / "calls.log").read_text().splitlines()
    assert read_profile == f"exec --bind {tmp_path} {image} python3 -m brainmt.launch.container --print-binds {profile}"
    binds = ["/home/lab:/lab", "/opt/x", "/tmp", "/data:/data:ro", "/scratch:/scratch"]
    assert run == " ".join(exec_command(str(FAKE_APPTAINER), str(image), binds, True, args)[1:])

    (tmp_path / "calls.log").unlink()
    proc = subprocess.run(["bash", str(ROOT / "containers" / "exec.sh"), "--no-nv", "info", "--config", "debug",
                           "--params-only"], capture_output=True, text=True, timeout=300,
                          env=_fake_env(tmp_path, BRAINMT_IMAGE=str(image)))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "calls.log").read_text().split() == ["exec", str(image), "python3", "-m", "brainmt.cli", *args]
    proc = subprocess.run(["bash", str(ROOT / "containers" / "exec.sh"), "--image", str(tmp_path / "missing.sif"),
                           "info"], capture_output=True, text=True, env=_fake_env(tmp_path))
    assert proc.returncode == 2 and "containers/build.sh" in proc.stderr


def test_launcher_and_print_binds_share_the_command_line(tmp_path):
    from brainmt.config import ClusterConfig
    from brainmt.launch.container import container_command

    cluster = ClusterConfig(container="img.sif", container_runtime="apptainer", binds=["/d:/d"], gpus_per_node=4)
    assert container_command(cluster, Path("c.yaml"), "S", Path("R"), "test") == exec_command(
        "apptainer", "img.sif", ["/d:/d"], True, ["train", "--config", "c.yaml", "--run-dir", "R", "--shards", "S",
                                                  "--split", "test"])
    profile = tmp_path / "p.yaml"
    profile.write_text("cluster:\n  binds: ['/a:/b', '/c']\n")
    proc = subprocess.run([sys.executable, "-m", "brainmt.launch.container", "--print-binds", str(profile)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout == "/a:/b\n/c\n", proc.stderr
    profile.write_text("cluster:\n  bind: ['/a']\n")
    proc = subprocess.run([sys.executable, "-m", "brainmt.launch.container", "--print-binds", str(profile)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "binds" in proc.stderr


def _fake_builder(tmp_path: Path, version: str = "apptainer version 1.3.4") -> Path:
    """A stand-in runtime for build.sh: reports ``version``, records `build` calls and their directory, writes a 3 MiB image."""
    fake = tmp_path / "fake-builder"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = --version ]; then echo "{version}"; exit 0; fi
echo "$PWD|$*" >> "{tmp_path / 'build.log'}"
for out in "$@"; do case "$out" in *.sif) head -c 3145728 /dev/zero > "$out" ;; esac; done
""")
    fake.chmod(0o755)
    return fake


def test_build_sh_passes_the_build_arguments_and_reports_size_and_time(tmp_path):
    fake = _fake_builder(tmp_path)
    env = {**os.environ, "BRAINMT_CONTAINER_RUNTIME": str(fake), "APPTAINER_TMPDIR": str(tmp_path)}
    out = tmp_path / "images" / "brainmt.sif"
    build = ["bash", str(ROOT / "containers" / "build.sh")]
    proc = subprocess.run([*build, "--arch", "9.0", "--max-jobs", "3", "--output", str(out), "--", "--notest"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cwd, args = (tmp_path / "build.log").read_text().strip().split("|")
    fakeroot = [] if os.geteuid() == 0 else ["--fakeroot"]
    assert cwd == str(ROOT)                         # %files paths are relative to the repository root
    assert args.split() == ["build", *fakeroot, "--build-arg", "cuda_arch=9.0", "--build-arg", "max_jobs=3", "--notest",
                            str(out), "Apptainer.def"]
    assert re.search(rf"built {re.escape(str(out))}: 3 MiB in 0m0\ds", proc.stdout), proc.stdout

    proc = subprocess.run([*build, "--output", str(out)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = subprocess.run([*build, "--output", "relative.sif", "--force"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = (tmp_path / "build.log").read_text().strip().splitlines()[-1].split("|")[1].split()
    jobs = int(next(a for a in last if a.startswith("max_jobs=")).split("=")[1])
    assert "cuda_arch=8.0,9.0" in last and "--force" in last and str(tmp_path / "relative.sif") in last and jobs >= 1

    env["BRAINMT_CONTAINER_RUNTIME"] = str(_fake_builder(tmp_path, "apptainer version 1.1.9"))
    proc = subprocess.run([*build, "--output", str(tmp_path / "old.sif")], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "need 1.2 or later" in proc.stderr
    env["BRAINMT_CONTAINER_RUNTIME"] = str(tmp_path / "no-such-runtime")
    proc = subprocess.run(build, capture_output=True, text=True, env=env)
    assert proc.returncode == 127 and "module load apptainer" in proc.stderr

