"""deploy/kubernetes/proxy-configmap.yaml from deploy/nginx/, its one owner.

``python -m tests.deploy.kubernetes`` (``make kubernetes-proxy-config``) rewrites it;
tests/deploy/test_kubernetes.py fails while it differs.
"""

from __future__ import annotations

import yaml

from tests.conftest import ROOT

NGINX = ROOT / "deploy" / "nginx"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "proxy-configmap.yaml"
HEADER = ("# deploy/nginx/nginx.conf.template, start.sh and stop.sh, byte for byte "
          "(tests/deploy/test_kubernetes.py\n# checks it). After changing any: "
          "`make kubernetes-proxy-config`.\n")


class Literal(str):
    """A string written as a YAML block (``|``), as people read files."""


def literal(dumper: yaml.SafeDumper, text: Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")


def proxy_configmap() -> str:
    """The ConfigMap the nginx Deployment mounts, carrying deploy/nginx's three files."""
    dumper = type("Dumper", (yaml.SafeDumper,), {})
    dumper.add_representer(Literal, literal)
    labels = {"app.kubernetes.io/name": "mnist-serving", "app.kubernetes.io/component": "proxy"}
    doc = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "mnist-proxy-config", "labels": labels},
           "data": {name: Literal((NGINX / name).read_text())
                    for name in ("nginx.conf.template", "start.sh", "stop.sh")}}
    return HEADER + yaml.dump(doc, Dumper=dumper, sort_keys=False, width=200)


if __name__ == "__main__":
    CONFIGMAP.write_text(proxy_configmap())
