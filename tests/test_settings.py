"""The one settings model (sidecar/settings.py): every setting reachable from each place it
names (flag, environment, config file, pod annotation, Helm value), one parser per kind of
value, and the README's configuration table generated from it."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import jsonpatch
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from k8s_tools import decode_patch, load_review  # noqa: E402

from sidecar import settings as S  # noqa: E402
from sidecar.cli import build_parser  # noqa: E402
from sidecar.errors import ConfigError  # noqa: E402
from sidecar.webhook.mutate import WebhookConfig, mutate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "dda-sidecar"

# One valid, non-default text per setting, and what the model makes of it.
SAMPLES = {
    "repo": ("https://host/o/r.git", "https://host/o/r.git"), "revision": ("v2", "v2"),
    "cache_dir": ("/tmp/dda-x", Path("/tmp/dda-x")), "cache_size": ("3G", 3 * 2**30),
    "chunk_size": ("4M", 4 * 2**20), "jobs": ("7", 7), "deadline": ("2m", 120.0), "request_timeout": ("500ms", 0.5),
    "retries": ("0", 0), "git_user": ("alice", "alice"), "git_token": ("tok", "tok"),
    "ca_bundle": ("/etc/ssl/private-ca.pem", "/etc/ssl/private-ca.pem"), "verify": ("before-read", "before-read"),
    "exit_with_app": ("true", True), "secret_dir": ("/secret", "/secret"), "ssh_key_file": ("/s/k", "/s/k"),
    "ssh_known_hosts_file": ("/s/kh", "/s/kh"), "fuse_fd_socket": ("/dda-csi/v.sock", "/dda-csi/v.sock"),
    "csi_endpoint": ("unix:///tmp/c.sock", "unix:///tmp/c.sock"), "csi_node_id": ("node-1", "node-1"),
    "csi_kubelet_dir": ("/var/lib/k", "/var/lib/k"), "csi_driver_name": ("x.example.com", "x.example.com"),
    "mount": ("/mnt/x", "/mnt/x"), "subdir": ("data", "data"), "allow_non_empty": ("yes", True),
    "log_file": ("/tmp/m.log", "/tmp/m.log"), "port": ("0", 0), "bind": ("127.0.0.1", "127.0.0.1"),
    "hooks_root": ("/work", "/work"), "hooks_exclude": ("a/*, *.tmp", ["a/*", "*.tmp"]),
    "sidecar_url": ("http://127.0.0.1:1", "http://127.0.0.1:1"),
    "webhook_listen": ("127.0.0.1:9443", "127.0.0.1:9443"), "webhook_tls_cert": ("/c", "/c"),
    "webhook_tls_key": ("/k", "/k"), "webhook_sidecar_image": ("img:1", "img:1"),
    "webhook_sidecar_pull_policy": ("Always", "Always"),
    "webhook_sidecar_resources": ('{"limits": {"memory": "1Gi"}}', {"limits": {"memory": "1Gi"}}),
    "webhook_native_sidecar": ("false", False), "webhook_on_invalid": ("warn", "warn"),
    "webhook_mode": ("privileged", "privileged"), "webhook_csi_driver": ("fuse.example.com", "fuse.example.com"),
    "webhook_cache_mode": ("hostPath", "hostPath"), "webhook_cache_size": ("1Gi", "1Gi"),
    "webhook_cache_host_path": ("/var/x", "/var/x"), "webhook_cache_fraction": ("0.5", 0.5),
    "webhook_metrics_port": ("9500", 9500), "webhook_default_mount_path": ("/dataset", "/dataset"),
    "webhook_startup_timeout": ("60", 60), "webhook_jobs": ("4", 4), "webhook_deadline": ("90s", 90.0),
    "webhook_retries": ("2", 2), "webhook_chunk_size": ("1M", 2**20),
}


def test_readme_table_is_generated_from_the_model():
    text = S.readme_path().read_text()
    assert S.README_BEGIN in text and S.README_END in text
    assert S.readme_with_table(text) == text, "README.md is stale: run `python -m sidecar.settings --write-readme`"
    # and the check can fail: a changed description shows
    field = S.Settings.model_fields["jobs"]
    old = field.description
    try:
        field.description = "something else"
        assert S.readme_with_table(text) != text
    finally:
        field.description = old


def test_every_setting_has_a_sample_and_one_name():
    assert set(SAMPLES) == set(S.Settings.model_fields) - {"remotes"}
    envs = [S.env_name(n) for n in S.Settings.model_fields]
    assert len(envs) == len(set(envs))
    flags = [f for n in S.Settings.model_fields for f in S.meta(n)["flags"] if not n.startswith("webhook_")]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_environment_and_config_file_reach_every_setting(name, tmp_path):
    text, value = SAMPLES[name]
    assert getattr(S.Settings.load(env={S.env_name(name): text}), name) == value
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({name: text}))
    assert getattr(S.Settings.load(env={}, config_file=f), name) == value


def _parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(n for n in SAMPLES if S.meta(n)["flags"]))
def test_flags_reach_their_settings(name):
    """Each declared flag exists on a `dda` command, and wins over the environment."""
    text, value = SAMPLES[name]
    flag = S.meta(name)["flags"][0]
    commands = [c for c, p in _parsers().items() if any(flag in a.option_strings and a.dest == name for a in p._actions)]
    assert commands, f"no dda command has {flag}"
    command = commands[0]
    needs = {"ls": [], "cat": ["u", "p"], "get": ["u", "p"], "mount": ["u", "m"], "upload": ["u", "f", "--to", "d"]}
    argv = [command, *needs.get(command, [])]
    argv += [flag] if name == "allow_non_empty" else [flag, text]
    ns = build_parser().parse_args(argv)
    other = SAMPLES[name][0] if name == "allow_non_empty" else ""
    env = {S.env_name(name): other} if other else {}
    assert getattr(S.Settings.load(S.flag_values(ns), env=env), name) == value


def test_precedence_and_one_line_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("jobs: 3\ndeadline: 10\n")
    s = S.Settings.load({"jobs": "5"}, env={"DDA_JOBS": "4", "DDA_DEADLINE": "20s"}, config_file=f)
    assert (s.jobs, s.deadline) == (5, 20.0)
    assert S.Settings.load(env={"DDA_REV": "old"}).revision == "old"
    assert S.Settings.load(env={"DDA_REV": "old", "DDA_REVISION": "new"}).revision == "new"
    for bad, fragment in (({"jobs": "0"}, "jobs: out of range"), ({"deadline": "soon"}, "deadline: cannot read"),
                          ({"chunk_size": "100K"}, "chunk_size: must be a multiple of 128K"),
                          ({"allow_non_empty": "maybe"}, "allow_non_empty: expected true or false"),
                          ({"port": "70000"}, "port: out of range")):
        with pytest.raises(ConfigError) as info:
            S.Settings.load(bad, env={})
        assert fragment in str(info.value) and "\n" not in str(info.value)
    # a secret never shows in the model's repr (logs)
    s = S.Settings.load(env={"DDA_GIT_TOKEN": "s3cr3t", "DDA_REMOTE_X_PASSWORD": "pw"})
    assert "s3cr3t" not in repr(s) and "pw" not in repr(s) and set(s.secrets()) == {"s3cr3t", "pw"}
    # Settings(...) alone reads nothing ambient
    assert S.Settings(repo="r").jobs == 16


def test_one_parser_per_kind():
    assert S.parse_size("1.5GiB") == S.parse_size("1.5G") == int(1.5 * 2**30)
    assert S.parse_quantity("500M") == 500 * 10**6 and S.parse_quantity("1Gi") == 2**30   # Kubernetes' own
    assert [S.parse_duration(t) for t in ("90", "90s", "1.5m", "250ms", "1h")] == [90, 90, 90, 0.25, 3600]
    assert [S.parse_bool(t) for t in ("on", "Yes", "1", "off", "NO", "0")] == [True] * 3 + [False] * 3
    with pytest.raises(ConfigError, match="x: expected true or false"):
        S.parse_bool("perhaps", "x")


POD_WIDE_REPO = "job_single_repo.json"


def _sidecar_env(review: dict, config: WebhookConfig) -> tuple[dict, dict[str, str]]:
    response = mutate(copy.deepcopy(review), config)["response"]
    assert response["allowed"], response
    pod = jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))
    side = [c for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
            if c["name"].startswith("dda-sidecar")][0]
    return response, {e["name"]: e["value"] for e in side["env"]}


def test_annotations_and_chart_settings_reach_the_sidecar():
    """jobs, deadline, retries, chunk size: chart default -> webhook -> pod annotation override ->
    the injected sidecar's environment -> the sidecar's own settings."""
    review = load_review(POD_WIDE_REPO)
    _, env = _sidecar_env(review, WebhookConfig.load(env={}))
    assert not {"DDA_JOBS", "DDA_DEADLINE", "DDA_RETRIES", "DDA_CHUNK_SIZE"} & set(env)   # sidecar defaults
    chart = WebhookConfig.load(env={"DDA_WEBHOOK_JOBS": "8", "DDA_WEBHOOK_DEADLINE": "90s",
                                    "DDA_WEBHOOK_RETRIES": "0", "DDA_WEBHOOK_CHUNK_SIZE": "4M"})
    _, env = _sidecar_env(review, chart)
    s = S.Settings.load(env=env)
    assert (s.jobs, s.deadline, s.retries, s.chunk_size) == (8, 90.0, 0, 4 * 2**20)
    annotations = review["request"]["object"]["metadata"]["annotations"]
    annotations.update({"dda-sidecar.io/jobs": "32", "dda-sidecar.io/deadline": "2m",
                        "dda-sidecar.io/chunk-size": "1M"})
    _, env = _sidecar_env(review, chart)
    s = S.Settings.load(env=env)
    assert (s.jobs, s.deadline, s.retries, s.chunk_size) == (32, 120.0, 0, 2**20)


def test_annotation_settings_per_named_repository():
    review = load_review("deployment_multi_repo.json")
    annotations = review["request"]["object"]["metadata"]["annotations"]
    names = sorted(k.split(".", 2)[-1] for k in annotations if k.startswith("dda-sidecar.io/repo."))
    annotations[f"dda-sidecar.io/jobs.{names[0]}"] = "3"
    response = mutate(copy.deepcopy(review), WebhookConfig.load(env={}))["response"]
    pod = jsonpatch.apply_patch(review["request"]["object"], decode_patch(response))
    sides = {c["name"]: {e["name"]: e["value"] for e in c["env"]}
             for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
             if c["name"].startswith("dda-sidecar")}
    assert sides[f"dda-sidecar-{names[0]}"]["DDA_JOBS"] == "3"
    assert "DDA_JOBS" not in sides[f"dda-sidecar-{names[1]}"]


@pytest.mark.parametrize("key,value,fragment", [
    ("jobs", "many", "expected a whole number"), ("jobs", "0", "out of range"),
    ("deadline", "-5", "cannot read"), ("retries", "1e3", "expected a whole number"),
    ("chunk-size", "3M1", "cannot read"), ("chunk-size", "100K", "multiple of 128K")])
def test_bad_setting_annotations_are_rejected_naming_them(key, value, fragment):
    review = load_review(POD_WIDE_REPO)
    review["request"]["object"]["metadata"]["annotations"][f"dda-sidecar.io/{key}"] = value
    response = mutate(review, WebhookConfig.load(env={}))["response"]
    assert response["allowed"] is False
    assert f"annotation dda-sidecar.io/{key}: " in response["status"]["message"]
    assert fragment in response["status"]["message"]


def test_helm_values_name_real_chart_values():
    """Every Helm value the model names exists in values.yaml and the chart's schema."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    for name in S.Settings.model_fields:
        helm = S.meta(name).get("helm")
        if not helm:
            continue
        node, props = values, schema
        for part in helm.split("."):
            assert isinstance(node, dict) and part in node, f"{name}: {helm} not in values.yaml"
            node = node[part]
            props = props["properties"][part]
    for name in S.annotation_settings():
        assert S.meta(name).get("helm") and S.meta("webhook_" + name).get("helm") == S.meta(name)["helm"]


def test_annotations_the_model_names_are_the_webhooks():
    from sidecar.webhook import mutate as M

    for name in S.Settings.model_fields:
        key = S.meta(name).get("annotation")
        if key:
            key = S.annotation_key(name) if key is True else key
            assert key in M.PER_REPO + M.POD_WIDE, f"{name}: dda-sidecar.io/{key} is not an annotation the webhook reads"
