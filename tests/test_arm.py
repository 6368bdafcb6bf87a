"""export.arm without the emulator: its failure paths (one line, exit code, no trusted half-made
cache), the guest command line run by a stand-in qemu that runs this Python, and the rule that an
ARM failure passes only where the manifest declares it. The real run is `make verify-arm`."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile

import pytest
from conftest import read_json, run_module, write_json

from export import arm
from export.arm import cache as provision
from export.arm import emulate
from export.errors import EmulatorError, ProvisionError, UsageError

TINY = dict(units=4, heads=1, query_len=2, kv_len=3, query_features=3, kv_features=2)


def script(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return str(path)


@pytest.fixture()
def tiny(artifact_factory, tmp_path):
    out, results = artifact_factory(formats=("onnx", "tflite"), **TINY)
    folder = tmp_path / "set"
    shutil.copytree(out, folder)
    return str(folder), {fmt: str(folder / os.path.basename(r.manifest_path)) for fmt, r in results.items()}


@pytest.fixture()
def fake_qemu(tmp_path):
    """A qemu stand-in: `qemu -cpu M -L ROOTFS PYTHON args...` runs this Python with the args."""
    return script(tmp_path / "qemu", f'#!/bin/sh\nshift 5\nexec {sys.executable} "$@"\n')


def test_qemu_missing_is_one_line_exit_8(tiny, tmp_path):
    done = run_module("export.arm", tiny[0], "--cache", str(tmp_path / "cache"),
                      env={"XATTN_ARM_QEMU": str(tmp_path / "no-such-qemu")})
    assert done.returncode == 8, done.stderr
    assert done.stderr.count("\n") == 1 and "no-such-qemu not found" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_rootfs_download_failing_leaves_nothing_trusted(tiny, tmp_path, fake_qemu):
    mm = script(tmp_path / "mmdebstrap",
                '#!/bin/sh\nmkdir -p "$5/usr"\necho "E: cannot fetch InRelease from $6" >&2\nexit 1\n')
    cache = tmp_path / "cache"
    done = run_module("export.arm", tiny[0], "--cache", str(cache), "--mirror", "http://127.0.0.1:9/x",
                      env={"XATTN_ARM_QEMU": fake_qemu, "XATTN_ARM_MMDEBSTRAP": mm})
    assert done.returncode == 8, done.stderr
    assert done.stderr.count("\n") == 1
    assert "mmdebstrap from http://127.0.0.1:9/x) failed (exit 1): E: cannot fetch" in done.stderr
    assert sorted(os.listdir(cache)) == [".lock"]  # no stamp, no partial root file system


def test_wheel_download_failing_is_one_line(tmp_path, fake_qemu, monkeypatch):
    mm = script(tmp_path / "mmdebstrap", '#!/bin/sh\nmkdir -p "$5/usr/bin"\ntouch "$5/usr/bin/python3.11"\n')
    monkeypatch.setenv("XATTN_ARM_MMDEBSTRAP", mm)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no local indexes or wheel folders
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    cache = str(tmp_path / "cache")
    with pytest.raises(ProvisionError, match=r"aarch64 wheels \(pip download\) failed \(exit 1\)"):
        provision.provision(cache, qemu=fake_qemu, index_url="http://127.0.0.1:9/simple")
    # The root file system step finished and is trusted; the wheels step left nothing.
    assert sorted(n for n in os.listdir(cache) if n != ".lock") == ["rootfs", "rootfs.stamp"]
    calls = []
    monkeypatch.setattr(provision, "_make_rootfs", lambda out, mirror: calls.append(out))
    with pytest.raises(ProvisionError):
        provision.provision(cache, qemu=fake_qemu, index_url="http://127.0.0.1:9/simple")
    assert calls == []  # a rerun reuses the stamped step


def test_a_changed_mirror_remakes_the_root_file_system(tmp_path, monkeypatch):
    made = []

    def make(out):
        os.makedirs(out)
        made.append(out)

    cache = str(tmp_path)
    provision._step(cache, "rootfs", {"mirror": "a"}, make)
    provision._step(cache, "rootfs", {"mirror": "a"}, make)
    provision._step(cache, "rootfs", {"mirror": "b"}, make)
    assert len(made) == 2


# -- the guest runs this project's wheel, installed with [runtime], never the checkout ------------


def pip_install_target(target, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--no-index", "--no-compile", "--target", str(target), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def installed_site(tmp_path_factory):
    """This project's wheel (provision.build_project_wheel) installed alone into a folder."""
    folder = tmp_path_factory.mktemp("guest")
    wheel = provision.build_project_wheel(str(folder / "wheel"))
    pip_install_target(folder / "site", "--no-deps", wheel)
    return str(folder / "site")


def test_the_project_wheel_is_whole_and_the_same_bytes_each_time(tmp_path):
    first = provision.build_project_wheel(str(tmp_path / "a"))
    again = provision.build_project_wheel(str(tmp_path / "b"))
    assert os.path.basename(first) == "xattn-0.1.0-py3-none-any.whl"
    assert provision._sha256(first) == provision._sha256(again)  # the site stamp's key
    with zipfile.ZipFile(first) as wheel:
        names = wheel.namelist()
        metadata_text = wheel.read("xattn-0.1.0.dist-info/METADATA").decode()
        record = wheel.read("xattn-0.1.0.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:  # pip checks these on install too
            name, digest, size = line.split(",")
            data = wheel.read(name)
            assert digest == "sha256=" + provision._urlsafe_digest(data) and int(size) == len(data)
    assert {"export/runtime/verify/__init__.py", "export/runtime/manifest.schema.json", "xattn/layer.py",
            "xattn-0.1.0.dist-info/entry_points.txt"} <= set(names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith("tests/")]
    assert 'Requires-Dist: onnxruntime>=1.20; extra == "runtime"' in metadata_text
    assert sorted(record[:-1]) == record[:-1] and record[-1] == "xattn-0.1.0.dist-info/RECORD,,"
    assert "uvicorn>=0.30" in provision.runtime_requirements()


def test_the_guest_imports_the_installed_wheel_and_refuses_the_checkout(tiny, tmp_path, fake_qemu,
                                                                       installed_site, monkeypatch):
    real_probe = emulate.probe  # the stand-in qemu runs this (x86) Python: only its machine differs
    monkeypatch.setattr(arm, "probe", lambda emulator, cpu: {**real_probe(emulator, cpu),
                                                             "machine": "aarch64"})
    argv, env = emulate.guest_command(emulator_of(tmp_path, fake_qemu), "max", ["-c", "pass"])
    assert env["PYTHONPATH"] == str(tmp_path / "site") and env["PYTHONSAFEPATH"] == "1"
    assert argv[:3] == [fake_qemu, "-cpu", "max"] and argv[-2:] == ["-c", "pass"]
    # The stand-in qemu runs this Python: with the wheel installed, export comes from there...
    emulator = provision.Emulator(rootfs=str(tmp_path / "rootfs"), site=installed_site, qemu=fake_qemu)
    probes, results = arm.run_all(emulator, tiny[0], ("max",))
    assert probes["max"]["export"] == os.path.join(installed_site, "export", "__init__.py")
    assert {r["status"] for r in results["max"].values()} == {"passed"}
    # ... and with nothing installed there, from the checkout: refused.
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(arm.__file__))), "__init__.py")
    refused = f"-cpu max: the guest imported export from {re.escape(checkout)}, not from the xattn wheel"
    with pytest.raises(EmulatorError, match=refused):
        arm.run_all(emulator_of(tmp_path, fake_qemu), tiny[0], ("max",))


def test_provisioning_installs_the_wheel_with_runtime_keyed_by_its_sha256(tmp_path, fake_qemu, monkeypatch):
    mm = script(tmp_path / "mmdebstrap", '#!/bin/sh\nmkdir -p "$5/usr/bin"\ntouch "$5/usr/bin/python3.11"\n')
    monkeypatch.setenv("XATTN_ARM_MMDEBSTRAP", mm)
    calls = []
    real_run = provision._run

    def run(argv, what):
        if "download" in argv:  # no network: one stand-in wheel in --dest
            calls.append(("download", argv))
            dest = argv[argv.index("--dest") + 1]
            os.makedirs(dest, exist_ok=True)
            open(os.path.join(dest, "numpy-2.4.0-cp311-cp311-manylinux_2_27_aarch64.whl"), "w").close()
        elif "install" in argv:
            calls.append(("install", argv))
            os.makedirs(argv[argv.index("--target") + 1])
        else:
            real_run(argv, what)

    monkeypatch.setattr(provision, "_run", run)
    cache = str(tmp_path / "cache")
    emulator = provision.provision(cache, qemu=fake_qemu)
    assert [kind for kind, _ in calls] == ["download", "install"]
    download, install = calls[0][1], calls[1][1]
    versions = provision.runtime_versions()
    pins = [f"{k}=={v}" for k, v in versions.items()]
    assert download[-len(pins) - len(provision.runtime_requirements()):] == [
        *provision.runtime_requirements(), *pins]
    assert install[-len(pins) - 1:] == ["xattn[runtime]==0.1.0", *pins]
    assert "--no-index" in install and "--no-compile" in install
    assert install[install.index("--target") + 1] == emulator.site + ".partial"
    links = [install[i + 1] for i, a in enumerate(install) if a == "--find-links"]
    assert links == [os.path.join(cache, "wheels"), os.path.join(cache, "project")]
    assert os.listdir(links[1]) == ["xattn-0.1.0-py3-none-any.whl"]
    assert install[install.index("--platform") + 1] == "manylinux2014_aarch64"
    assert install[install.index("--python-version") + 1] == "3.11"
    stamp = read_json(os.path.join(cache, "site.stamp"))
    assert stamp["project"]["sha256"] == provision._sha256(os.path.join(links[1], os.listdir(links[1])[0]))
    # The same code again: nothing is redone. Changed code (other wheel bytes): only the install.
    provision.provision(cache, qemu=fake_qemu)
    assert len(calls) == 2
    real_build = provision.build_project_wheel

    def build_changed(folder):
        path = real_build(folder)
        with zipfile.ZipFile(path, "a") as wheel:
            wheel.writestr("export/changed.py", "CHANGED = True\n")
        return path

    monkeypatch.setattr(provision, "build_project_wheel", build_changed)
    provision.provision(cache, qemu=fake_qemu)
    assert [kind for kind, _ in calls] == ["download", "install", "install"]
    assert read_json(os.path.join(cache, "site.stamp"))["project"]["sha256"] != stamp["project"]["sha256"]
    assert sorted(n for n in os.listdir(cache) if not n.endswith(".stamp")) == [
        ".lock", "project", "rootfs", "site", "wheels"]  # no build folder left behind


def test_unknown_cpu_model_is_a_usage_error(tiny):
    done = run_module("export.arm", tiny[0], "--cpu", "pentium")
    assert done.returncode == 2 and "unknown CPU model 'pentium'" in done.stderr
    assert done.stderr.count("\n") == 1


def test_cpuinfo_names_the_model(tmp_path):
    emulate.write_cpuinfo(str(tmp_path), "cortex-a53")
    text = (tmp_path / "proc" / "cpuinfo").read_text()
    assert "CPU implementer\t: 0x41" in text and "CPU part\t: 0xd03" in text
    assert "CPU revision\t: 4" in text and text.count("processor") == (os.cpu_count() or 1)
    emulate.write_cpuinfo(str(tmp_path), "max,sme=off")
    assert "CPU part\t: 0x051" in (tmp_path / "proc" / "cpuinfo").read_text()
    with pytest.raises(UsageError):
        emulate.write_cpuinfo(str(tmp_path), "cortex-a9")


def emulator_of(tmp_path, qemu: str) -> provision.Emulator:
    os.makedirs(tmp_path / "rootfs" / "usr" / "bin", exist_ok=True)
    os.makedirs(tmp_path / "site", exist_ok=True)
    return provision.Emulator(rootfs=str(tmp_path / "rootfs"), site=str(tmp_path / "site"), qemu=qemu)


def guest_probe(emulator: provision.Emulator, features=()) -> dict:
    """What `emulate.probe` says of a guest that imported the wheel installed in its site folder."""
    return {"machine": "aarch64", "heavy_imports": [], "features": list(features),
            "export": os.path.join(emulator.site, "export", "__init__.py")}


def test_guest_runs_the_verifier_and_reads_its_json(tiny, tmp_path, fake_qemu):
    results = emulate.verify(emulator_of(tmp_path, fake_qemu), tiny[0], "cortex-a53")
    assert sorted(results) == sorted(os.path.basename(p) for p in tiny[1].values())
    for r in results.values():
        assert r["status"] == "passed" and r["metrics"]["max_abs"] < 1e-4
        assert len(r["outputs_sha256"]) == 64
    info = emulate.probe(emulator_of(tmp_path, fake_qemu), "max")
    assert info["heavy_imports"] == []  # export.runtime.verify.cli pulls in no TensorFlow, Keras, onnx


def test_guest_crash_is_one_line_exit_9(tiny, tmp_path):
    crash = script(tmp_path / "qemu", "#!/bin/sh\necho 'qemu: uncaught target signal 11' >&2\nexit 139\n")
    with pytest.raises(EmulatorError, match=r"-cpu max: the emulated verifier exited 139: qemu: uncaught"):
        emulate.verify(emulator_of(tmp_path, crash), tiny[0], "max")


@pytest.fixture()
def checked(tiny, tmp_path, fake_qemu, monkeypatch):
    """check_path on the tiny set with the stand-in qemu; the ONNX file fails on `cortex-a53`."""
    monkeypatch.setattr(arm, "provision", lambda cache, **kw: emulator_of(tmp_path, fake_qemu))
    monkeypatch.setattr(arm, "probe", lambda emulator, cpu: guest_probe(emulator))
    real_verify = arm.verify

    def verify(emulator, path, cpu):
        results = real_verify(emulator, path, cpu)
        if cpu == "cortex-a53":
            onnx = results[os.path.basename(tiny[1]["onnx"])]
            onnx.update(status="failed", reason="golden vectors: max abs diff 0.5 exceeds atol=0.0001")
            onnx["metrics"]["max_abs"] = 0.5
        return results

    monkeypatch.setattr(arm, "verify", verify)
    return lambda: arm.check_path(tiny[0], cpus=("max", "cortex-a53"), cache=str(tmp_path / "c"))


def test_an_undeclared_arm_failure_fails(checked, tiny):
    report = checked()
    assert report["failed"] == 1
    onnx = next(f for f in report["files"] if f["format"] == "onnx")
    assert onnx["problems"] == ["-cpu cortex-a53: golden vectors: max abs diff 0.5 exceeds "
                                "atol=0.0001 (not declared in the manifest's deployment.arm)"]
    assert onnx["cpus"]["max"]["same_bits_as_x86"] is True


def test_a_declared_arm_failure_passes_and_only_for_its_model(checked, tiny):
    manifest = read_json(tiny[1]["onnx"])
    manifest["deployment"]["arm"] = {"cpus": {"max": {"within_gate": False}}}
    write_json(tiny[1]["onnx"], manifest)
    assert checked()["failed"] == 1  # declared for another model: still a failure
    manifest["deployment"]["arm"]["cpus"]["cortex-a53"] = {"within_gate": False}
    write_json(tiny[1]["onnx"], manifest)
    report = checked()
    assert report["failed"] == 0
    onnx = next(f for f in report["files"] if f["format"] == "onnx")
    assert onnx["cpus"]["cortex-a53"]["declared_within_gate"] is False


def test_verify_json_keeps_the_lines_and_writes_results(tiny, tmp_path):
    out = tmp_path / "r.json"
    done = run_module("export.verify", tiny[0], "--json", str(out))
    assert done.returncode == 0 and "2 passed, 0 failed" in done.stdout
    results = json.loads(out.read_text())
    assert {r["status"] for r in results} == {"passed"} and all(r["metrics"] for r in results)
    bad = run_module("export.verify", tiny[0], "--json", str(tmp_path / "no" / "r.json"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "cannot write --json" in bad.stderr


def test_export_arm_records_deployment_before_publishing(tmp_path, fake_qemu, monkeypatch):
    from export.pipeline import ExportRequest, export_artifacts
    from export.runtime.verify import verify_path
    from export.spec import ArtifactSpec

    monkeypatch.setattr(arm, "provision", lambda cache, **kw: emulator_of(tmp_path, fake_qemu))
    monkeypatch.setattr(arm, "probe", lambda emulator, cpu: guest_probe(
        emulator, ["fphp"] if cpu == "max" else []))
    out = tmp_path / "out"
    out.mkdir()
    results = export_artifacts(ExportRequest(
        specs={"tflite": ArtifactSpec(batch=1, **TINY), "onnx": ArtifactSpec(batch=None, **TINY)},
        output_dir=str(out), arm=True))
    for r in results:
        entry = read_json(r.manifest_path)["deployment"]["arm"]
        assert sorted(entry["cpus"]) == sorted(arm.DEFAULT_CPUS)
        assert entry["cpus"]["max"]["features"] == ["fphp"]
        for cpu in entry["cpus"].values():
            assert cpu["within_gate"] is True and cpu["same_bits_as_x86"] is True
            assert cpu["max_abs"] < 1e-4 and cpu["gate"] == {"atol": 1e-4}
    # Written before the set was sealed: the published manifests verify as they are.
    assert [v.status for v in verify_path(str(out))] == ["passed", "passed"]
    assert not [n for n in os.listdir(out) if n.startswith(".xattn-staging")]


def test_export_arm_without_qemu_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    done = run_module("export.onnx", "--units", "4", "--heads", "1", "--query-len", "2", "--kv-len", "3",
                      "--query-features", "3", "--kv-features", "2", "--arm", "--output-dir", str(out),
                      "-q", env={"XATTN_ARM_QEMU": str(tmp_path / "no-qemu")})
    assert done.returncode == 8, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"python -m export.onnx: error: {tmp_path / 'no-qemu'} not found: install qemu-user-static "
        "(make verify-arm does: apt-get install qemu-user-static mmdebstrap)"]
    assert not out.exists() or [n for n in os.listdir(out) if not n.startswith(".")] == []
    assert "convert" not in done.stdout + done.stderr  # it stopped before building anything


def test_export_arm_writes_each_manifest_once_and_the_signature_covers_it(tmp_path, fake_qemu, monkeypatch):
    """One pass: the ARM report goes in before any manifest is written; each is written once into
    the stage, already final (deployment.arm in), then signed and published as it is."""
    pytest.importorskip("model_signing")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from export import publish
    from export.pipeline import ExportRequest, export_artifacts
    from export.runtime import manifest as manifest_module
    from export.runtime.verify import verify_path
    from export.spec import ArtifactSpec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = tmp_path / "key.pem", tmp_path / "key.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    monkeypatch.setattr(arm, "provision", lambda cache, **kw: emulator_of(tmp_path, fake_qemu))
    monkeypatch.setattr(arm, "probe", lambda emulator, cpu: guest_probe(emulator))
    writes = []  # (folder, name, bytes written)
    real_write = manifest_module.write_manifest

    def write(path, manifest):
        real_write(path, manifest)
        with open(path, "rb") as f:
            writes.append((os.path.dirname(path), os.path.basename(path), f.read()))

    for module in list(sys.modules.values()):  # every module holding the function by name
        if getattr(module, "write_manifest", None) is real_write:
            monkeypatch.setattr(module, "write_manifest", write)
    handed = {}  # manifest name -> its bytes when handed to the publish step
    real_publish = publish.publish

    def publish_and_look(stage, output_dir, names):
        for name in names:
            if name.endswith((".onnx.json", ".tflite.json", "_savedmodel.json")):
                with open(os.path.join(stage, name), "rb") as f:
                    handed[name] = f.read()
        return real_publish(stage, output_dir, names)

    monkeypatch.setattr(publish, "publish", publish_and_look)
    out = tmp_path / "out"
    results = export_artifacts(ExportRequest(
        specs={"tflite": ArtifactSpec(batch=1, **TINY), "onnx": ArtifactSpec(batch=None, **TINY),
               "savedmodel": ArtifactSpec(batch=None, **TINY)},
        output_dir=str(out), arm=True, sign_key=str(private)))

    names = sorted(os.path.basename(r.manifest_path) for r in results)
    staged = [(name, data) for folder, name, data in writes
              if os.path.basename(folder).startswith(publish.STAGING_PREFIX)]
    assert sorted(name for name, _ in staged) == names  # each manifest written once
    drafts = [name for folder, name, _ in writes if os.path.basename(folder).startswith(".arm-")]
    assert sorted(drafts) == sorted(n for n in names if not n.endswith("_savedmodel.json"))
    for name, data in staged:
        manifest = json.loads(data)
        assert ("arm" in manifest["deployment"]) if manifest["format"] != "savedmodel" else \
            "deployment" not in manifest
        assert handed[name] == data == (out / name).read_bytes()  # published as written
    for r in results:  # the results describe the published files
        assert os.path.dirname(r.path) == str(out) and os.path.dirname(r.manifest_path) == str(out)
        assert r.manifest == read_json(r.manifest_path)
    checked = verify_path(str(out), public_key=str(public))
    assert [(v.status, v.signature) for v in checked] == [("passed", "signature ok")] * 3
    assert sorted(os.listdir(out)) == sorted(n for n in os.listdir(out) if not n.startswith(".arm-"))
