"""run_grid.py on an existing Ray cluster: a real two-node cluster started here with `ray start` (token
authentication on), the grid through --address and through `ray job submit`, the refusals (exit 2, nothing in
MLflow), the local Ray that ignores the cluster, the --dry-run capacity check; and the cluster files in docker/
checked as far as this machine can (Ray's own validation of the launcher config, the manifests against the
image, the grid CLI and the README)."""
import copy
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import psutil
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from grids import ROOT, tiny_grid, wait_for, write_grid

slow = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
CMP = {"name": "cmp", "dataset": "shapes", "rows": ["detector"], "columns": ["method"],
       "grid": [{"detector": ["retinanet"], "method": ["baseline", "lgd"]}]}
ONE = {**CMP, "grid": [{"detector": ["retinanet"], "method": ["baseline"]}]}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path  # RAY_TMPDIR under which the head recorded itself (root/ray/ray_current_cluster)
    address: str  # the head's GCS
    dashboard: str
    token: str
    nodes: dict  # node id -> custom resource naming the node ("lgd_head" / "lgd_second")

    def env(self, **over) -> dict:
        """A driver's environment: the cluster's token, RAY_AUTH_MODE left unset (run_grid.py turns it on)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        return {**env, "PYTHONUNBUFFERED": "1", "RAY_AUTH_TOKEN": self.token, **over}


def _own_processes(root: Path) -> list[psutil.Process]:
    """The processes of the cluster under ``root`` (each names its temp dir) and their children: `ray stop`
    would stop every Ray on the machine, other people's included."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(str(root) in a for a in (p.info["cmdline"] or [])):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def _stop(root: Path) -> None:
    procs = _own_processes(root)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _ray_nodes(address: str, env: dict) -> dict:
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); print(json.dumps({n['NodeID']: "
            "n['Resources'] for n in ray.nodes() if n['Alive']}))" % address)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "RAY_AUTH_MODE": "token"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="lgdrc", dir="/tmp"))  # short: Ray's socket paths are length-limited
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port, dashboard = _free_port(), _free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        for args in (["--head", "--port", str(port), "--resources", '{"lgd_head": 1}', "--temp-dir",
                      str(root / "ray"), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                      "--ray-client-server-port", str(_free_port())],
                     ["--address", f"127.0.0.1:{port}", "--resources", '{"lgd_second": 1}', "--temp-dir",
                      str(root / "second")]):
            r = subprocess.run([RAY, "start", *args, *common, "--dashboard-agent-listen-port", str(_free_port())],
                               env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        c = Cluster(root, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", token, {})
        nodes = wait_for(lambda: (lambda n: n if len(n) == 2 else None)(_ray_nodes(c.address, c.env())), 60,
                         "the second node to join")
        c.nodes = {nid: next(k for k in res if k.startswith("lgd_")) for nid, res in nodes.items()}
        yield c
    finally:
        _stop(root)
        shutil.rmtree(root, ignore_errors=True)


def _grid_cmd(grid: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "orchestration" / "run_grid.py"), "--grid", str(grid), "--output", str(out),
            *extra]


def _run(cmd, env, timeout=300):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _trials(out: Path, grid: str, uri: str | None = None):
    c = MlflowClient(tracking_uri=uri or f"sqlite:///{out / 'mlflow.db'}")
    exp = c.get_experiment_by_name(f"lgd-grid-{grid}")
    return [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("lgd.kind") == "trial"]


@slow
def test_grid_on_a_token_cluster_runs_trials_on_both_nodes(cluster, tmp_path):
    grid = write_grid(tmp_path, tiny_grid("twonode", [CMP]))
    out = tmp_path / "out"
    dry = _run(_grid_cmd(grid, out, "--address", cluster.address, "--dry-run"), cluster.env(), timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert ": 2 nodes, 2 CPU, 0 GPU; one trial needs 1 worker x (1 CPU): fits, 2 trials at once" in dry.stdout
    assert not out.exists()
    t0 = time.time()
    r = _run(_grid_cmd(grid, out, "--address", cluster.address), cluster.env())
    print(f"two-trial grid on the two-node cluster: {time.time() - t0:.1f}s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "could not check their placement groups" not in r.stdout + r.stderr  # the state API takes the token
    trials = _trials(out, "twonode")
    assert len(trials) == 2 and {t.data.tags["lgd.state"] for t in trials} == {"done"}
    # one CPU per node, two one-CPU trials at once: one trial on each node, recorded in MLflow
    assert {t.data.tags["lgd.node_id"] for t in trials} == set(cluster.nodes)
    assert all(t.data.tags["lgd.node_ip"] for t in trials)
    rows = (out / "tables" / "cmp.csv").read_text()
    assert rows.count(",done,") == 2 and "| RetinaNet |" in (out / "tables" / "cmp.md").read_text()


@slow
def test_a_trial_the_cluster_cannot_hold_is_refused_before_mlflow(cluster, tmp_path):
    grid = tiny_grid("toobig", [ONE], num_workers=8)
    grid["resources"].update(use_gpu=True)
    path = write_grid(tmp_path, grid)
    out = tmp_path / "out"
    dry = _run(_grid_cmd(path, out, "--address", cluster.address, "--dry-run"), cluster.env(), timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert ("one trial needs 8 workers x (1 CPU + 1 GPU): CANNOT be scheduled, the cluster has no GPU"
            in dry.stdout)
    r = _run(_grid_cmd(path, out, "--address", cluster.address), cluster.env(), timeout=120)
    assert r.returncode == 2 and "CANNOT be scheduled" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not out.exists()


@slow
def test_a_refused_or_dead_cluster_exits_2_within_bounds_and_creates_nothing(cluster, tmp_path):
    grid = write_grid(tmp_path, tiny_grid("refused", [ONE]))
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(16))
    refused_env = cluster.env(RAY_AUTH_TOKEN_PATH=str(wrong))
    del refused_env["RAY_AUTH_TOKEN"]
    with socket.socket() as silent:  # accepts TCP, never answers: only the connect timeout ends the wait
        silent.bind(("", 0))
        silent.listen(8)
        cases = {  # run side by side: each waits on its own
            "refused": (["--address", cluster.address], refused_env),
            "dead": (["--address", f"127.0.0.1:{_free_port()}"], cluster.env()),
            "silent": (["--address", f"127.0.0.1:{silent.getsockname()[1]}", "--connect-timeout", "6"],
                       cluster.env()),
        }
        t0 = time.time()
        procs = {k: subprocess.Popen(_grid_cmd(grid, tmp_path / k, *a), cwd=ROOT, env=e, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (a, e) in cases.items()}
        results = {k: (p.communicate(timeout=180)[1], p.returncode) for k, p in procs.items()}
        took = time.time() - t0
    for k, (err, code) in results.items():
        assert code == 2 and "Traceback" not in err, (k, err[-3000:])
        assert not (tmp_path / k).exists(), k  # no MLflow store, no parent run left RUNNING, no output folder
    refused = results["refused"][0]
    assert "refused this driver" in refused and "RAY_AUTH_TOKEN" in refused
    assert f"sent the token from RAY_AUTH_TOKEN_PATH={wrong}" in refused
    assert "is unreachable" in results["dead"][0]
    assert "did not accept this driver within 6 s" in results["silent"][0]
    assert took < 120


@slow
def test_without_address_a_local_ray_even_where_a_cluster_is_recorded(cluster, tmp_path):
    """With RAY_TMPDIR at the cluster's, `ray.init()` would join it: run_grid.py starts its own Ray."""
    grid = tiny_grid("local", [ONE])
    grid["resources"].update(use_gpu=True)  # refused by the local Ray's capacity check, after it started
    path = write_grid(tmp_path, grid)
    out = tmp_path / "out"
    env = cluster.env(RAY_TMPDIR=str(cluster.root))
    auto = _run(_grid_cmd(path, out, "--address", "auto", "--dry-run"), env, timeout=120)
    assert auto.returncode == 0 and "Ray cluster at " in auto.stdout and ": 2 nodes, 2 CPU" in auto.stdout, (
        auto.stderr[-3000:])
    r = _run(_grid_cmd(path, out, "--num-cpus", "1"), env, timeout=180)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Started a local Ray instance" in r.stderr  # Ray's own words: not "Connected to Ray cluster"
    assert "local Ray: 1 node, 1 CPU, 0 GPU" in r.stderr and "Connecting to existing Ray cluster" not in r.stderr
    assert not out.exists()


@slow
def test_ray_job_submit_runs_the_grid_on_the_cluster(cluster, tmp_path):
    grid = write_grid(tmp_path, tiny_grid("jobsub", [ONE]))
    out = tmp_path / "out"
    env = cluster.env(RAY_AUTH_MODE="token")  # the job CLI sends the token only in token mode
    r = _run([RAY, "job", "submit", "--address", cluster.dashboard, "--", "python",
              str(ROOT / "orchestration" / "run_grid.py"), "--grid", str(grid), "--output", str(out)], env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in r.stdout  # RAY_ADDRESS of the job: the cluster itself
    trials = _trials(out, "jobsub")
    assert len(trials) == 1 and trials[0].data.tags["lgd.state"] == "done"
    assert trials[0].data.tags["lgd.node_id"] in cluster.nodes
    assert "| RetinaNet |" in (out / "tables" / "cmp.md").read_text()


# --- docker/: the image, the KubeRay manifests, the cluster-launcher config --------------------------------------
DOCKER = ROOT / "docker"
IMAGE = "lgd-grid:latest"
SECRET = {"name": "lgd-ray-token", "key": "auth_token"}


def _manifests() -> dict:
    docs = [d for f in sorted((DOCKER / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _ray_containers(m: dict) -> dict:
    cluster, job = m["RayCluster"]["spec"], m["RayJob"]["spec"]
    found = {"head": cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
             "submitter": job["submitterPodTemplate"]["spec"]["containers"][0]}
    for g in cluster["workerGroupSpecs"]:
        found[g["groupName"]] = g["template"]["spec"]["containers"][0]
    return found


def test_dockerfile_pins_the_tested_torch_and_ray():
    text = (DOCKER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["TORCH_VERSION"] == version("torch") and args["TORCHVISION_VERSION"] == version("torchvision")
    assert args["RAY_VERSION"] == ray.__version__
    pins = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>=2.4,<={args["TORCH_VERSION"]}"' in pins
    assert f'"torchvision>=0.19,<={args["TORCHVISION_VERSION"]}"' in pins
    base = re.search(r"^FROM python:(\d+\.\d+)-slim$", text, re.M)
    assert base and base.group(1) == f"{sys.version_info.major}.{sys.version_info.minor}"  # Ray needs the same
    assert f"-t {IMAGE} ." in text and "pip install -e ." in text


def test_kuberay_manifests_run_the_image_with_the_token_secret():
    m = _manifests()
    assert set(m) == {"RayCluster", "RayJob", "PersistentVolumeClaim", "Deployment", "Service"}
    assert m["RayCluster"]["spec"]["rayVersion"] == ray.__version__
    assert m["RayJob"]["spec"]["clusterSelector"] == {"ray.io/cluster": m["RayCluster"]["metadata"]["name"]}
    for name, c in _ray_containers(m).items():
        env = {e["name"]: e for e in c["env"]}
        assert c["image"] == IMAGE, name
        assert env["RAY_AUTH_MODE"]["value"] == "token", name
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == SECRET, name
    mlflow = m["Deployment"]["spec"]["template"]["spec"]
    assert mlflow["containers"][0]["image"] == IMAGE
    claim = m["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in m["PersistentVolumeClaim"]["spec"]["accessModes"]
    pods = [m["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"], mlflow,
            *(g["template"]["spec"] for g in m["RayCluster"]["spec"]["workerGroupSpecs"])]
    for pod in pods:
        vols = {v["name"]: v for v in pod["volumes"]}
        mount = next(x for x in pod["containers"][0]["volumeMounts"] if x["mountPath"] == "/shared")
        assert vols[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim


def test_rayjob_entrypoint_is_a_valid_grid_command_the_cluster_can_hold():
    from orchestration.cluster import Capacity
    from orchestration.grid import expand, load_grid
    from orchestration.run_grid import parse_args

    m = _manifests()
    argv = shlex.split(m["RayJob"]["spec"]["entrypoint"])
    assert argv[0] == "lgd-grid"  # the console script of pyproject.toml, installed in the image
    args = parse_args(argv[1:])
    grid_file = ROOT / Path(args.grid).relative_to("/opt/lgd-grid")  # the image's WORKDIR holds experiments/
    grid = load_grid(grid_file)
    roots = dict(d.split("=", 1) for d in args.dataset)
    assert len(expand(grid, roots, require_data=False)) > 0
    assert args.storage.startswith("/shared/") and args.output.startswith("/shared/")
    svc = m["Service"]
    assert args.tracking_uri == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert f"--allowed-hosts {svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}" in " ".join(
        m["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]).replace(",", " --allowed-hosts ")
    spec = m["RayCluster"]["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no trial
    nodes = [{"CPU": float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]),
              "GPU": float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])}
             for g in spec["workerGroupSpecs"] for _ in range(g["replicas"])]
    assert Capacity.of(grid.resources).trials(nodes) >= 1  # the worker group is sized for the documented grid


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((DOCKER / "cluster-launcher.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs first
    assert cfg["docker"]["image"] == IMAGE and "-v /shared:/shared" in cfg["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("RAY_AUTH_MODE=token ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token ray start --address=$RAY_HEAD_IP:6379" in c
               for c in cfg["worker_start_ray_commands"])
    bad = copy.deepcopy(cfg)
    bad["docker"]["imag"] = IMAGE
    with pytest.raises(Exception, match="imag"):  # the validation is real: a misspelt key is refused
        validate_config(prepare_config(bad))


def test_readme_documents_the_cluster_files_and_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):]
    section = section[:section.index("\n## ", 3)]
    for fragment in (f"docker build -f docker/Dockerfile -t {IMAGE} .",
                     f"kubectl create secret generic {SECRET['name']} --from-literal={SECRET['key']}=",
                     "kubectl apply -f docker/k8s/shared-storage.yaml -f docker/k8s/mlflow.yaml "
                     "-f docker/k8s/raycluster.yaml", "kubectl apply -f docker/k8s/rayjob.yaml",
                     "ray up docker/cluster-launcher.yaml", "RAY_AUTH_TOKEN", "ray get-auth-token",
                     "RAY_AUTH_MODE=token ray job submit", "--address", "--dry-run", "--storage", "--tracking-uri"):
        assert fragment in section, fragment
