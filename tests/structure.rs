#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! The shape a newcomer can rely on, checked on the parsed source of every crate: no cycles
//! between a crate's modules, no function over 80 lines outside tests, and a thin proxy-wasm
//! adapter (`src/host.rs`, at most 450 lines).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

const MAX_FUNCTION_LINES: usize = 80;
const MAX_ADAPTER_LINES: usize = 450;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The crates' source roots.
fn crates() -> Vec<(&'static str, PathBuf)> {
    vec![
        ("prepaid-credits", repo().join("src")),
        ("credits", repo().join("crates/credits/src")),
        ("ledger", repo().join("crates/ledger/src")),
    ]
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The crate's top-level module a file belongs to (`store/books.rs` → `store`); `None` for the
/// crate root and for binaries.
fn top_module(root: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(root).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (!matches!(name.as_str(), "lib" | "main" | "bin")).then_some(name)
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg") && a.meta.require_list().is_ok_and(|l| l.tokens.to_string().contains("test")))
    })
}

/// What one file says: the top-level modules of its crate it uses, and its functions' lengths.
#[derive(Default)]
struct Survey {
    uses: BTreeSet<String>,
    long_functions: Vec<(String, usize, usize)>,
}

impl Survey {
    /// A path that starts at the crate's root names one of its top-level modules. (`super::…`
    /// stays within a top-level module, or reaches the crate root from one.)
    fn path_start(&mut self, segments: &[String]) {
        if let (Some("crate"), Some(module)) = (segments.first().map(String::as_str), segments.get(1)) {
            self.uses.insert(module.clone());
        }
    }

    fn function(&mut self, name: &str, attrs: &[syn::Attribute], block: &syn::Block) {
        if is_test_only(attrs) {
            return;
        }
        let (start, end) = (block.brace_token.span.open().start().line, block.brace_token.span.close().end().line);
        let lines = end - start + 1;
        if lines > MAX_FUNCTION_LINES {
            self.long_functions.push((name.to_owned(), start, lines));
        }
    }
}

impl<'ast> Visit<'ast> for Survey {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test_only(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_test_only(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if is_test_only(&f.attrs) {
            return;
        }
        self.function(&f.sig.ident.to_string(), &f.attrs, &f.block);
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if is_test_only(&f.attrs) {
            return;
        }
        self.function(&f.sig.ident.to_string(), &f.attrs, &f.block);
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_use_tree(&mut self, tree: &'ast syn::UseTree) {
        fn walk(tree: &syn::UseTree, prefix: &mut Vec<String>, survey: &mut Survey) {
            match tree {
                syn::UseTree::Path(p) => {
                    prefix.push(p.ident.to_string());
                    walk(&p.tree, prefix, survey);
                    prefix.pop();
                }
                syn::UseTree::Name(n) => {
                    prefix.push(n.ident.to_string());
                    survey.path_start(prefix);
                    prefix.pop();
                }
                syn::UseTree::Rename(r) => {
                    prefix.push(r.ident.to_string());
                    survey.path_start(prefix);
                    prefix.pop();
                }
                syn::UseTree::Glob(_) => survey.path_start(prefix),
                syn::UseTree::Group(g) => g.items.iter().for_each(|t| walk(t, prefix, survey)),
            }
        }
        walk(tree, &mut Vec::new(), self);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.path_start(&segments);
        syn::visit::visit_path(self, path);
    }
}

fn survey(file: &Path) -> Survey {
    let text = std::fs::read_to_string(file).unwrap();
    let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut survey = Survey::default();
    survey.visit_file(&ast);
    survey
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn dfs(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut found = stack[i..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = dfs(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| dfs(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_depends_on_itself_through_others() {
    for (name, root) in crates() {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in rust_files(&root) {
            let Some(module) = top_module(&root, &file) else { continue };
            // Test-only modules (the simulator, test files included by path) may use anything.
            if module == "simulation" || module.ends_with("_tests") {
                continue;
            }
            let s = survey(&file);
            let uses = s.uses.into_iter().filter(|m| *m != module);
            graph.entry(module.clone()).or_default().extend(uses);
        }
        assert_eq!(cycle(&graph), None, "{name}: modules that depend on each other (a cycle)");
    }
}

#[test]
fn no_function_outside_tests_is_longer_than_80_lines() {
    let mut long = Vec::new();
    for (_, root) in crates() {
        for file in rust_files(&root) {
            for (function, line, lines) in survey(&file).long_functions {
                long.push(format!("{}:{line} {function}: {lines} lines", file.strip_prefix(repo()).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FUNCTION_LINES} lines:\n{}", long.join("\n"));
}

#[test]
fn the_proxy_wasm_adapter_stays_thin() {
    let lines = std::fs::read_to_string(repo().join("src/host.rs")).unwrap().lines().count();
    assert!(lines <= MAX_ADAPTER_LINES, "src/host.rs has {lines} lines (at most {MAX_ADAPTER_LINES})");
}
