//! `ferry render`: load a source once and print what ferry makes of it.

use anyhow::Context;

use ferry_proxy::run::Mode;

use crate::cli::{RenderArgs, RenderWhat};

pub async fn run(args: RenderArgs) -> anyhow::Result<()> {
    let text = if args.what == RenderWhat::Manifests {
        manifests(&args.image, &args.config)?
    } else {
        let snap = crate::source::load_once(&args.source)
            .await
            .context("loading the cluster")?;
        match args.what {
            RenderWhat::Routes => crate::cmd_ingress::render_routes(&snap, &args.ingress)?,
            RenderWhat::Zone => crate::cmd_dns::render_zone(&snap, &args.dns)?,
            RenderWhat::Iptables | RenderWhat::Ebpf => {
                let mut opts = args.proxy.options();
                // `--what iptables` shows nftables' script with `--mode nftables`.
                opts.mode = match (args.what, opts.mode) {
                    (RenderWhat::Ebpf, _) => Mode::Ebpf,
                    (_, Mode::Nftables) => Mode::Nftables,
                    _ => Mode::Iptables,
                };
                ferry_proxy::run::render(&snap, &opts)
            }
            RenderWhat::Summary | RenderWhat::Manifests => ferry_cluster::summary::render(&snap),
        }
    };
    print!("{text}");
    Ok(())
}

/// deploy/*.yaml in apply order, embedded so the binary can print them.
pub(crate) const DEPLOY: [(&str, &str); 6] = [
    ("00-namespace.yaml", include_str!("../deploy/00-namespace.yaml")),
    ("01-rbac.yaml", include_str!("../deploy/01-rbac.yaml")),
    ("02-config.yaml", include_str!("../deploy/02-config.yaml")),
    ("03-daemonset.yaml", include_str!("../deploy/03-daemonset.yaml")),
    ("04-dns-service.yaml", include_str!("../deploy/04-dns-service.yaml")),
    ("05-ingressclass.yaml", include_str!("../deploy/05-ingressclass.yaml")),
];

/// The manifests as one multi-document stream, with the DaemonSet's image
/// and the ConfigMap's values replaced: a kustomize-free way to configure
/// `kubectl apply -f -`.
pub fn manifests(image: &str, config: &[String]) -> anyhow::Result<String> {
    let mut values = Vec::new();
    for kv in config {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--config {kv:?}: expected KEY=VALUE"))?;
        let known = DEPLOY[2]
            .1
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{k}:")));
        if !known {
            anyhow::bail!("--config {k}: not a key of the ferry-config ConfigMap (deploy/02-config.yaml)");
        }
        values.push((k.to_string(), v.to_string()));
    }
    let mut out = String::new();
    for (name, text) in DEPLOY {
        out.push_str(&format!("# deploy/{name}\n"));
        for line in text.lines() {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            if trimmed.starts_with("image: ") {
                out.push_str(&format!("{indent}image: {image}\n"));
                continue;
            }
            match values.iter().find(|(k, _)| trimmed.starts_with(&format!("{k}:"))) {
                Some((k, v)) if name == "02-config.yaml" => out.push_str(&format!("{indent}{k}: {v:?}\n")),
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out.push_str("---\n");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_take_image_and_config() {
        let text = manifests("registry.example/ferry:1.2", &["PROXY_MODE=ebpf".into()]).unwrap();
        assert!(text.contains("image: registry.example/ferry:1.2"));
        assert!(text.contains("PROXY_MODE: \"ebpf\""));
        assert!(!text.contains("image: ferry:dev"));
        // Still valid YAML, every document.
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        assert!(docs.len() > DEPLOY.len(), "{} documents", docs.len());
        assert!(manifests("x", &["NOPE=1".into()])
            .unwrap_err()
            .to_string()
            .contains("NOPE"));
    }
}
