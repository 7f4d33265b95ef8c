"""``pkg deploy render`` and ``pkg deploy apply``: a pushed bento image as Kubernetes or KServe objects."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from .bentos import _bento_errors


@click.group()
def deploy() -> None:
    """Kubernetes and KServe objects for a bento's pushed image, and applying them."""


@deploy.command("render")
@click.argument("ref")
@click.option("--image", required=True, help="The pushed image, REGISTRY/REPO:TAG (pkg push BENTO REGISTRY/REPO:TAG).")
@click.option("--target", type=click.Choice(["kubernetes", "kserve"]), help="[deploy.target, or kubernetes]")
@click.option("--autoscale", type=click.Choice(["hpa", "keda", "none"]), help="[deploy.autoscale, or hpa]")
@click.option("--replicas", type=click.IntRange(1), help="Replicas; the minimum under an autoscaler [1].")
@click.option("--max-replicas", type=click.IntRange(1), help="The autoscaler's maximum [10].")
@click.option("--namespace", help="Namespace written into the kustomization [none: kubectl's].")
@click.option("--monitoring", type=click.Choice(["annotations", "servicemonitor"]),
              help="prometheus.io annotations, or a ServiceMonitor and PrometheusRule [annotations].")
@click.option("--probe", type=click.Choice(["http", "exec"]),
              help="Probes as HTTP requests of the kubelet, or `python3 -m bento_like probe` in the container [http].")
@click.option("--model-image", help="KServe: a modelcar image (pkg containerize --model-only) for the models.")
@click.option("--measure-startup", is_flag=True,
              help="Start the bento here and size the startup probe from how long it takes to become ready.")
@click.option("--no-verify-image", is_flag=True, help="Render without checking that the registry holds the image.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to the registry (always allowed for 127.0.0.1/localhost).")
@click.option("-o", "--output", "output", default="deploy", show_default=True,
              help="Directory of the kustomize tree, or - for one multi-document YAML on stdout.")
@_bento_errors
def render_command(ref: str, image: str, output: str, measure_startup: bool, no_verify_image: bool, insecure: bool,
                   **flags: Any) -> None:
    """Render the objects that run bento REF from IMAGE: a kustomize base, an overlay for this version, and
    Prometheus rules. Every value comes from the @service declaration and the build config's deploy: section;
    these flags win over it."""
    from ..builders.deploy import render_bento

    to_stdout = output == "-"
    say = (lambda line: click.echo(line, err=True))
    rendered = render_bento(ref, image, verify_image=not no_verify_image, insecure=insecure,
                            measure=measure_startup, progress=say, **flags)
    if to_stdout:
        sys.stdout.write(rendered.stream())
        return
    out = Path(output)
    existed = (out / "base").is_dir()
    changed = rendered.write(out)
    plan = rendered.plan
    cfg = plan.config
    kinds = ", ".join(f"{d['kind']} {d['metadata']['name']}" for d in rendered.documents)
    click.echo(f"{plan.bento} -> {cfg.target}{' in namespace ' + cfg.namespace if cfg.namespace else ''}: {kinds}")
    models = f" (models from oci://{cfg.model_image.removeprefix('oci://')})" if cfg.model_image else ""
    click.echo(f"  image      {rendered.image}{models}")
    scaling = ("fixed" if cfg.autoscale == "none" else
               f"{cfg.autoscale.upper()} on in-flight + queued requests, {plan.target_load:g} per replica; up at once, "
               f"down after {cfg.scale_down_window_s} s")
    click.echo(f"  replicas   {cfg.replicas}" + (f"..{cfg.max_replicas}, {scaling}" if cfg.autoscale != "none" else ""))
    click.echo(f"  startup    up to {plan.startup_budget_s} s to become ready ({rendered.startup_source})")
    click.echo(f"  stopping   serves {cfg.drain_s:g} s after SIGTERM, then {plan.graceful_s:g} s for in-flight "
               "requests")
    click.echo(f"  resources  {_resources(plan)}")
    for note in rendered.notes:
        click.echo(f"  note       {note}")
    base_changed = [c for c in changed if c.startswith("base/")]
    if existed and base_changed:
        click.echo(f"the base changed ({', '.join(c.removeprefix('base/') for c in base_changed)}): applying this "
                   "version changes more than the image")
    click.echo(f"wrote {out}/ ({len(changed)} file(s) changed); apply: pkg deploy apply {out / rendered.overlay}")


def _resources(plan: Any) -> str:
    parts = []
    if plan.cpu is not None:
        parts.append(f"cpu {plan.cpu:g}")
    if plan.memory is not None:
        parts.append(f"memory {plan.memory}")
    if plan.gpu:
        parts.append(f"{plan.gpu} GPU" + (f" ({plan.gpu_type})" if plan.gpu_type else ""))
    return ", ".join(parts) or "none declared"


@deploy.command("apply")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--version", "version", help="Which overlay, when PATH holds several.")
@click.option("--context", help="kubectl's --context.")
@click.option("--namespace", help="kubectl's --namespace.")
@click.option("--dry-run", is_flag=True, help="Print the command and the objects it would apply; change nothing.")
@_bento_errors
def apply_command(path: str, version: str | None, context: str | None, namespace: str | None, dry_run: bool) -> None:
    """kubectl apply -k of a rendered overlay (PATH: the overlay, or the directory pkg deploy render wrote)."""
    from ..builders.deploy import apply, apply_plan, built_objects

    plan = apply_plan(Path(path), version, context, namespace)
    if dry_run:
        objects = built_objects(plan.overlay)
        import yaml

        click.echo(f"would run: {' '.join(plan.command)}")
        for doc in yaml.safe_load_all(objects):
            if doc:
                meta = doc.get("metadata", {})
                where = f" (namespace {meta['namespace']})" if meta.get("namespace") else ""
                click.echo(f"  {doc['kind']}/{meta.get('name')}{where}")
        return
    code = apply(plan)
    if code != 0:
        raise click.ClickException(f"{' '.join(plan.command)} exited with {code}")


COMMANDS = [deploy]
