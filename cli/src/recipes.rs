//! `faultbox recipes list|show`: the embedded recipe library.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use clap::Subcommand;
use faultbox_spec::load::recipes;

/// What to do with the recipe library.
#[derive(Debug, Subcommand)]
pub enum RecipesCommand {
    /// List every recipe: `protocol.name(params)` and what it does.
    List,
    /// Show one recipe (`postgres.disk_full`) or a protocol's (`postgres`),
    /// with how to load it.
    Show {
        /// `protocol.name` or `protocol`.
        name: String,
    },
}

/// How to load a protocol's recipes. `http` is loaded under an alias: its
/// own name would hide the `http()` healthcheck in that file.
fn load_line(protocol: &str) -> String {
    if protocol == "http" {
        "load(\"@faultbox/recipes/http.star\", http_faults = \"http\")".to_string()
    } else {
        format!("load(\"@faultbox/recipes/{protocol}.star\", \"{protocol}\")")
    }
}

/// Runs the command; returns the exit code.
pub fn run(command: RecipesCommand) -> Result<i32> {
    let all = recipes();
    match command {
        RecipesCommand::List => {
            let mut text = String::new();
            let mut protocol = String::new();
            for r in &all {
                if r.protocol != protocol {
                    protocol = r.protocol.clone();
                    let _ = writeln!(text, "{protocol}  ({})", load_line(&protocol));
                }
                let call = format!("{}.{}({})", r.protocol, r.name, r.params);
                let _ = writeln!(text, "  {call:<58} {}", r.doc);
            }
            crate::print_stdout(&text)?;
            Ok(0)
        }
        RecipesCommand::Show { name } => {
            let (protocol, recipe) = match name.split_once('.') {
                Some((p, n)) => (p.to_string(), Some(n.to_string())),
                None => (name.clone(), None),
            };
            let chosen: Vec<_> = all
                .iter()
                .filter(|r| r.protocol == protocol && recipe.as_ref().is_none_or(|n| &r.name == n))
                .collect();
            if chosen.is_empty() {
                let known: Vec<String> = all
                    .iter()
                    .map(|r| format!("{}.{}", r.protocol, r.name))
                    .collect();
                bail!(
                    "no recipe named {name:?}; `faultbox recipes list` shows them all ({})",
                    known.join(", ")
                );
            }
            let mut text = format!("{}\n\n", load_line(&protocol));
            for r in chosen {
                let _ = writeln!(text, "{}.{}({}): {}", r.protocol, r.name, r.params, r.doc);
                if recipe.is_some() {
                    let _ = writeln!(text, "\n{}", r.source);
                }
            }
            crate::print_stdout(&text)?;
            Ok(0)
        }
    }
}
