"""pkg deploy render over three real bentos (a CPU service; a GPU service with two APIs; a KServe service whose
models come from a modelcar): the YAML as printed against golden files, strict schema validation of every object,
the kustomize tree built by kubectl, and the rules by promtool.

Golden files hold the bento's version as VERSION (it is a digest of the locked environment too). After an
intended change, rewrite them with UPDATE_GOLDEN=1 and read the diff.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import bento_like as bl
from bento_like.builders.bento import build_bento
from bento_like.cli.main import cli

from k8s_validate import KINDS_WITH_SCHEMA, validate

SERVICES = Path(__file__).parent / "services"
GOLDEN = Path(__file__).parent / "golden"
IMAGES = {"cpu": "registry.example.com/fraud/scorer:1.4.0", "gpu": "registry.example.com/search/embedder:2.0.1",
          "modelcar": "registry.example.com/ml/ranker:v1"}
MODELS = {"cpu": "fraud-weights", "gpu": "embedder-weights", "modelcar": "ranker-weights"}
CASES = sorted(IMAGES)


@pytest.fixture(scope="module")
def bentos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The three services built into bentos (pkg build, with their deploy: sections) in a private home."""
    home = tmp_path_factory.mktemp("deploy-home")
    saved = os.environ.get("BENTO_LIKE_HOME")
    os.environ["BENTO_LIKE_HOME"] = str(home)
    try:
        tags = {}
        for case in CASES:
            bl.models.save(MODELS[case], {"scale": 2.0}, framework="pickle")
            project = home / "src" / case
            shutil.copytree(SERVICES / case, project)
            tags[case] = build_bento(project).bento.tag
        yield tags
    finally:
        if saved is None:
            os.environ.pop("BENTO_LIKE_HOME", None)
        else:
            os.environ["BENTO_LIKE_HOME"] = saved


def _render(tag: str, *args: str) -> str:
    result = CliRunner().invoke(cli, ["deploy", "render", tag, *args])
    assert result.exit_code == 0, result.output
    return result.output


def _stream(bentos: dict[str, str], case: str) -> str:
    return _render(bentos[case], "--image", IMAGES[case], "--no-verify-image", "-o", "-")


@pytest.mark.parametrize("case", CASES)
def test_rendered_yaml_matches_the_golden_file(bentos: dict[str, str], case: str) -> None:
    text = _stream(bentos, case).replace(bentos[case].split(":")[1], "VERSION")
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"the render of {case} differs from {golden} (UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("case", CASES)
def test_every_object_passes_strict_schema_validation(bentos: dict[str, str], case: str) -> None:
    docs = list(yaml.safe_load_all(_stream(bentos, case)))
    assert {(d["apiVersion"], d["kind"]) for d in docs} <= KINDS_WITH_SCHEMA
    assert validate(docs) == []
    # the check can fail: one misspelled field in each object is named
    for i, doc in enumerate(docs):
        broken = copy.deepcopy(docs)
        broken[i]["spec"]["replicaz" if doc["kind"] != "PrometheusRule" else "groupz"] = 1
        problems = validate(broken)
        assert problems and all("replicaz" in p or "groupz" in p for p in problems), (doc["kind"], problems)


def test_what_each_service_gets(bentos: dict[str, str]) -> None:
    """The values that matter, read from the objects rather than from the golden files."""
    cpu = {d["kind"]: d for d in yaml.safe_load_all(_stream(bentos, "cpu"))}
    pod = cpu["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert container["args"] == ["--port", "3000", "--drain-delay", "5", "--graceful-timeout", "10"]
    assert pod["terminationGracePeriodSeconds"] > 5 + 10  # drain + graceful timeout, and the shutdown hooks
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]
    assert cpu["Deployment"]["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "replicas" not in cpu["Deployment"]["spec"]  # the HPA owns the count
    hpa = cpu["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 20)
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "32"}  # 64 / 2
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600

    gpu = {d["kind"]: d for d in yaml.safe_load_all(_stream(bentos, "gpu"))}
    pod = gpu["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # declared startup 90 s: the probe allows three times that
    probe = pod["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 270
    trigger = gpu["ScaledObject"]["spec"]["triggers"][0]
    assert trigger["metadata"]["threshold"] == "64" and "or vector(0)" in trigger["metadata"]["query"]
    assert {"ServiceMonitor", "PrometheusRule"} <= set(gpu)

    isvc = next(yaml.safe_load_all(_stream(bentos, "modelcar")))
    predictor = isvc["spec"]["predictor"]
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container" and container["ports"][0]["name"] == "http1"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["STORAGE_URI"] == "oci://registry.example.com/ml/ranker-models:v1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


@pytest.mark.parametrize("case", CASES)
def test_the_kustomize_tree_builds_to_the_same_objects(bentos: dict[str, str], case: str, tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (it builds the kustomize tree offline)")
    out = _render(bentos[case], "--image", IMAGES[case], "--no-verify-image", "-o", str(tmp_path / "deploy"))
    version = bentos[case].split(":")[1]
    overlay = tmp_path / "deploy" / "overlays" / version
    assert f"pkg deploy apply {overlay}" in out
    built = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True).stdout

    def key(doc: dict) -> tuple[str, str]:
        return doc["kind"], doc["metadata"]["name"]

    assert sorted(yaml.safe_load_all(built), key=key) == sorted(yaml.safe_load_all(_stream(bentos, case)), key=key)
    # a second version is another overlay; the base it shares is unchanged, so a rollout is a tag change
    again = _render(bentos[case], "--image", IMAGES[case].rsplit(":", 1)[0] + ":next", "--no-verify-image",
                    "-o", str(tmp_path / "deploy"))
    assert "the base changed" not in again


@pytest.mark.parametrize("case", CASES)
def test_shipped_prometheus_rules_pass_promtool(bentos: dict[str, str], case: str, tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    _render(bentos[case], "--image", IMAGES[case], "--no-verify-image", "-o", str(tmp_path))
    rules = tmp_path / "monitoring" / "prometheus-rules.yaml"
    check = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_bad_deploy_settings_are_refused_naming_the_key(tmp_path: Path, home: Path) -> None:
    project = tmp_path / "p"
    shutil.copytree(SERVICES / "cpu", project)
    (project / "bentofile.yaml").write_text("service: service.py:FraudScorer\ndeploy:\n  replica: 2\n")
    from bento_like.builders.bento import BuildConfigError, load_build_config

    with pytest.raises(BuildConfigError, match=r"deploy.replica: unknown key"):
        load_build_config(project)
    (project / "bentofile.yaml").write_text("service: service.py:FraudScorer\ndeploy:\n  autoscale: magic\n")
    with pytest.raises(BuildConfigError, match=r"deploy.autoscale"):
        load_build_config(project)


def test_render_refuses_what_cannot_work(bentos: dict[str, str]) -> None:
    runner = CliRunner()
    cases = [
        (["--image", "registry.example.com/x"], "has no tag"),
        (["--image", "r.example.com/x:1", "--replicas", "5", "--max-replicas", "2"], "at most max_replicas"),
        (["--image", "r.example.com/x:1", "--model-image", "r.example.com/m:1"], "model_image (a KServe modelcar) needs target: kserve"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["deploy", "render", bentos["cpu"], *args, "--no-verify-image", "-o", "-"])
        assert result.exit_code == 1 and message in result.output, result.output


def test_measure_startup_sizes_the_probe_from_a_real_start(bentos: dict[str, str], tmp_path: Path) -> None:
    out = _render(bentos["cpu"], "--image", IMAGES["cpu"], "--no-verify-image", "--measure-startup",
                  "-o", str(tmp_path))
    line = next(line for line in out.splitlines() if line.strip().startswith("startup"))
    assert "measured: ready in" in line and "up to 60 s" in line, out  # a second or two here: the 60 s floor


def test_apply_dry_run_names_the_command_and_objects_and_apply_needs_a_kubeconfig(
        bentos: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    _render(bentos["cpu"], "--image", IMAGES["cpu"], "--no-verify-image", "-o", str(tmp_path))
    version = bentos["cpu"].split(":")[1]
    result = CliRunner().invoke(cli, ["deploy", "apply", str(tmp_path), "--dry-run", "--context", "prod"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"would run: kubectl --context prod apply -k {tmp_path / 'overlays' / version}"
    assert "  Deployment/fraud-scorer (namespace fraud)" in lines
    assert "  HorizontalPodAutoscaler/fraud-scorer (namespace fraud)" in lines
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    result = CliRunner().invoke(cli, ["deploy", "apply", str(tmp_path)])
    assert result.exit_code == 1 and "no kubeconfig" in result.output, result.output


def _doc_blocks(lang: str) -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    blocks, inside, current = [], None, []
    for line in text.splitlines():
        if inside is None and line.startswith("```"):
            inside, current = line[3:].strip(), []
        elif inside is not None and line.startswith("```"):
            if inside == lang:
                blocks.append("\n".join(current))
            inside = None
        elif inside is not None:
            current.append(line)
    return blocks


def test_docs_deploy_page_shows_what_the_code_does(bentos: dict[str, str], tmp_path: Path) -> None:
    """docs/deploy.md as a reader follows it: its deploy: section is the CPU service's, its printed summary is what
    render prints for that service (but for the version and digest), and every pkg command and option it shows
    exists."""
    from bento_like.builders.bento import load_build_config

    (config_block,) = _doc_blocks("yaml")
    shutil.copytree(SERVICES / "cpu", tmp_path / "p")
    (tmp_path / "p" / "bentofile.yaml").write_text(config_block)
    assert load_build_config(tmp_path / "p") == load_build_config(SERVICES / "cpu")

    summary = next(b for b in _doc_blocks("") if b.startswith("fraud_scorer:"))
    printed = _render(bentos["cpu"], "--image", IMAGES["cpu"], "--no-verify-image", "-o", str(tmp_path / "out"))
    stable = [line for line in summary.splitlines() if not any(k in line for k in ("sha256", "...", "wrote"))]
    assert stable and all(line in printed.splitlines() for line in stable), (stable, printed)

    import shlex

    shown = [line for block in _doc_blocks("bash") for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line.split("#")[0]) for line in shown if line.startswith("pkg ")]
    assert len(commands) >= 6
    for words in commands:
        command, rest = cli, words[1:]
        while hasattr(command, "commands"):
            command, rest = command.commands[rest[0]], rest[1:]
        known = {opt for param in command.params for opt in param.opts}
        unknown = [w for w in rest if w.startswith("-") and w not in known]
        assert not unknown, f"docs/deploy.md: `{' '.join(words)}` shows options pkg does not have: {unknown}"


def test_without_a_namespace_rules_judge_each_namespace_apart_and_keda_is_refused(
        bentos: dict[str, str], tmp_path: Path) -> None:
    """Manifests left to `kubectl -n`: the rules select the service's pods in every namespace (they group by
    namespace); KEDA's query sums over pods, so it is refused rather than counting other namespaces' pods."""
    from bento_like.bentos import BentoStore
    from bento_like.builders.deploy import DeployError
    from bento_like.builders.deploy.config import DeployConfig
    from bento_like.builders.deploy.render import render

    bento = bentos["cpu"]
    plain = render(BentoStore().get(bento), IMAGES["cpu"].rsplit(":", 1)[0] + ":1", DeployConfig())
    assert all("namespace" not in d["metadata"] for d in plain.documents)
    rules = yaml.safe_load(plain.files["monitoring/prometheus-rules.yaml"])
    exprs = [r["expr"] for r in rules["groups"][0]["rules"]]
    assert all('namespace="' not in e and 'pod=~"fraud-scorer-' in e for e in exprs), exprs
    assert all("by (namespace" in e for e in exprs)
    if shutil.which("promtool"):
        (tmp_path / "rules.yaml").write_text(plain.files["monitoring/prometheus-rules.yaml"])
        check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    with pytest.raises(DeployError, match="needs the namespace"):
        render(BentoStore().get(bento), IMAGES["cpu"], DeployConfig(autoscale="keda"))


DEPENDENT = '''
import bento_like as bl


@bl.service(name="tokenizer", resources={"cpu": "500m", "memory": "512Mi"}, workers=2)
class Tokenizer:
    @bl.api
    def split(self, text: str) -> list[str]:
        return text.split()


@bl.service(name="search", resources={"cpu": "2", "memory": "1Gi"})
class Search:
    tokenizer = bl.depends(Tokenizer)

    @bl.api
    def query(self, text: str) -> list[str]:
        return self.tokenizer.split(text=text)
'''


def test_a_dependency_run_beside_the_service_adds_its_resources_to_the_pod(bentos: dict[str, str],
                                                                         tmp_path: Path) -> None:
    project = tmp_path / "search"
    project.mkdir()
    (project / "service.py").write_text(DEPENDENT)
    (project / "bentofile.yaml").write_text("service: service.py:Search\ndeploy:\n  namespace: search\n")
    tag = build_bento(project).bento.tag
    out = _render(tag, "--image", "r.example.com/search:1", "--no-verify-image", "-o", str(tmp_path / "out"))
    assert "resources  cpu 2.5, memory 1536Mi" in out and "dependency tokenizer runs inside each pod" in out, out
    deployment = yaml.safe_load((tmp_path / "out" / "base" / "deployment.yaml").read_text())
    resources = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "2500m", "memory": "1536Mi"}, "limits": {"memory": "1536Mi"}}
