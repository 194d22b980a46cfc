//! Inside every crate of the workspace the modules form a DAG: no module
//! reaches, directly or through others, back to itself.
//!
//! For each crate (every top-level directory with a `Cargo.toml` and a
//! `src/`, and the root package's `src/`) the checker reads `src/**/*.rs`
//! and builds the module graph:
//!
//! - a node is a module file: `foo.rs` or `foo/mod.rs` is `foo`,
//!   `foo/bar.rs` is `foo::bar`; the crate root (`lib.rs`, `main.rs`) is no
//!   node (it declares and re-exports everything), and inline modules
//!   (`mod x { … }`) belong to their file;
//! - an edge is a reference from one file to another module: `use` trees,
//!   and paths starting with `crate::`, `self::`, `super::`, a child module's
//!   name, or a name a `use` brought into scope. A path through a `use` of
//!   another module (a re-export such as `crate::Tokenizer`) counts as a
//!   reference to the module that defines the item, and an item imported
//!   from another crate is no edge;
//! - comments, string and character literals, and `#[cfg(test)]` items
//!   (the `mod tests` blocks, test-only module files) are ignored.
//!
//! A cycle fails the test, printed with the file and line of each reference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path from the crate root (empty = the root).
type ModPath = Vec<String>;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

/// A path written in a file: where it is (module scope, line) and its segments.
struct Ref {
    scope: ModPath,
    segs: Vec<String>,
    line: usize,
}

struct FileInfo {
    rel: String,
    module: ModPath,
    refs: Vec<Ref>,
}

/// Replaces comments, string literals and character literals by spaces,
/// keeping new lines (for line numbers) and lifetimes.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let n = c.len();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let is_ident = |ch: char| ch.is_alphanumeric() || ch == '_';
    let mut i = 0;
    while i < n {
        let prev_ident = i > 0 && is_ident(c[i - 1]);
        if c[i] == '/' && i + 1 < n && c[i + 1] == '/' {
            while i < n && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && i + 1 < n && c[i + 1] == '*' {
            let mut depth = 0;
            while i < n {
                if c[i] == '/' && i + 1 < n && c[i + 1] == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && i + 1 < n && c[i + 1] == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < n && c[i] != '"' {
                if c[i] == '\\' && i + 1 < n {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if (c[i] == 'r'
            && (!prev_ident || (i == 1 && c[0] == 'b') || (i >= 2 && c[i - 1] == 'b' && !is_ident(c[i - 2]))))
            && raw_string_hashes(&c, i + 1).is_some()
        {
            let hashes = raw_string_hashes(&c, i + 1).expect("checked");
            let mut j = i + 1 + hashes + 1;
            loop {
                if j >= n {
                    break;
                }
                if c[j] == '"' && (0..hashes).all(|h| j + 1 + h < n && c[j + 1 + h] == '#') {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &c[i..j.min(n)] {
                blank(&mut out, ch);
            }
            i = j;
        } else if c[i] == '\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if i + 1 < n && c[i + 1] == '\\' {
                (i + 3..n).find(|&j| c[j] == '\'')
            } else if i + 2 < n && c[i + 2] == '\'' {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    for &ch in &c[i..=e] {
                        blank(&mut out, ch);
                    }
                    i = e + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// At `i` (just after an `r`): `#`* then `"` opens a raw string; the number of `#`.
fn raw_string_hashes(c: &[char], i: usize) -> Option<usize> {
    let mut h = 0;
    while i + h < c.len() && c[i + h] == '#' {
        h += 1;
    }
    (i + h < c.len() && c[i + h] == '"').then_some(h)
}

fn tokenize(code: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = code.chars().collect();
    let mut toks = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch.is_alphabetic() || ch == '_' {
            let s = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            toks.push((Tok::Ident(c[s..i].iter().collect()), line));
        } else if ch.is_ascii_digit() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
        } else if ch == ':' && i + 1 < c.len() && c[i + 1] == ':' {
            toks.push((Tok::PathSep, line));
            i += 2;
        } else {
            toks.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    toks
}

fn is_punct(t: Option<&(Tok, usize)>, p: char) -> bool {
    matches!(t, Some((Tok::Punct(c), _)) if *c == p)
}

fn ident(t: Option<&(Tok, usize)>) -> Option<&str> {
    match t {
        Some((Tok::Ident(s), _)) => Some(s),
        _ => None,
    }
}

/// The index just past the bracket group opening at `i` (`open` at `toks[i]`).
fn skip_group(toks: &[(Tok, usize)], i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    let mut j = i;
    while j < toks.len() {
        if is_punct(toks.get(j), open) {
            depth += 1;
        } else if is_punct(toks.get(j), close) {
            depth -= 1;
            if depth == 0 {
                return j + 1;
            }
        }
        j += 1;
    }
    j
}

/// Drops every item under `#[cfg(test)]` and returns the names of test-only
/// module files (`#[cfg(test)] mod x;`).
fn drop_test_items(toks: &mut Vec<(Tok, usize)>) -> Vec<String> {
    let cfg_test = [
        Tok::Punct('#'),
        Tok::Punct('['),
        Tok::Ident("cfg".into()),
        Tok::Punct('('),
        Tok::Ident("test".into()),
    ];
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i + cfg_test.len() + 2 <= toks.len() {
        let hit = cfg_test.iter().enumerate().all(|(k, t)| toks[i + k].0 == *t)
            && is_punct(toks.get(i + 5), ')')
            && is_punct(toks.get(i + 6), ']');
        if !hit {
            i += 1;
            continue;
        }
        let mut j = i + 7;
        while is_punct(toks.get(j), '#') && is_punct(toks.get(j + 1), '[') {
            j = skip_group(toks, j + 1, '[', ']');
        }
        // The item: up to its first `;` or its `{ … }` outside parentheses and brackets.
        let mut k = j;
        let mut depth = 0i32;
        while k < toks.len() {
            match &toks[k].0 {
                Tok::Punct('(') | Tok::Punct('[') => depth += 1,
                Tok::Punct(')') | Tok::Punct(']') => depth -= 1,
                Tok::Punct(';') if depth == 0 => {
                    k += 1;
                    break;
                }
                Tok::Punct('{') if depth == 0 => {
                    k = skip_group(toks, k, '{', '}');
                    break;
                }
                _ => {}
            }
            k += 1;
        }
        let item = &toks[j..k.min(toks.len())];
        if let Some(p) = item.iter().position(|t| t.0 == Tok::Ident("mod".into())) {
            if let (Some(name), true) = (ident(item.get(p + 1)), is_punct(item.get(p + 2), ';')) {
                test_mods.push(name.to_string());
            }
        }
        toks.drain(i..k.min(toks.len()));
    }
    test_mods
}

/// One leaf of a `use` tree: its full path, the name it binds, and whether it is a glob.
struct UseLeaf {
    segs: Vec<String>,
    alias: Option<String>,
    glob: bool,
}

fn parse_use_tree(toks: &[(Tok, usize)], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<UseLeaf>) {
    if toks.get(*i).map(|t| &t.0) == Some(&Tok::PathSep) {
        prefix.push("::".into()); // `::name`: another crate
        *i += 1;
    }
    loop {
        match toks.get(*i).map(|t| &t.0) {
            Some(Tok::Punct('*')) => {
                *i += 1;
                out.push(UseLeaf { segs: prefix, alias: None, glob: true });
                return;
            }
            Some(Tok::Punct('{')) => {
                *i += 1;
                loop {
                    match toks.get(*i).map(|t| &t.0) {
                        None => return,
                        Some(Tok::Punct('}')) => {
                            *i += 1;
                            return;
                        }
                        Some(Tok::Punct(',')) => *i += 1,
                        _ => {
                            let before = *i;
                            parse_use_tree(toks, i, prefix.clone(), out);
                            if *i == before {
                                *i += 1; // not a use tree: do not loop forever
                            }
                        }
                    }
                }
            }
            Some(Tok::Ident(s)) => {
                let s = s.clone();
                *i += 1;
                let is_self_leaf =
                    s == "self" && !prefix.is_empty() && toks.get(*i).map(|t| &t.0) != Some(&Tok::PathSep);
                if !is_self_leaf {
                    prefix.push(s);
                }
                if toks.get(*i).map(|t| &t.0) == Some(&Tok::PathSep) {
                    *i += 1;
                    continue;
                }
                let mut alias = prefix.last().cloned();
                if ident(toks.get(*i)) == Some("as") {
                    alias = ident(toks.get(*i + 1)).map(String::from);
                    *i += 2;
                }
                let alias = alias.filter(|a| a != "_" && a != "self" && a != "super" && a != "crate");
                out.push(UseLeaf { segs: prefix, alias, glob: false });
                return;
            }
            _ => return,
        }
    }
}

/// The module a source file is, from its path under `src/`; `None` for a
/// crate root or a file under `src/bin/`.
fn module_of_file(rel: &Path) -> Option<ModPath> {
    let mut segs: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if segs.first().map(String::as_str) == Some("bin") {
        return None;
    }
    let last = segs.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if segs.is_empty() && (stem == "lib" || stem == "main") {
        return None;
    }
    if stem != "mod" {
        segs.push(stem.to_string());
    }
    Some(segs)
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            rs_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// A crate's module graph: nodes, and per edge the places that make it.
pub struct Graph {
    pub nodes: BTreeSet<String>,
    pub edges: BTreeMap<(String, String), Vec<String>>,
}

fn join(m: &[String]) -> String {
    m.join("::")
}

struct Crate {
    files: Vec<FileInfo>,
    /// Module paths known to exist (files and inline modules) → the file node they live in.
    known: BTreeMap<ModPath, ModPath>,
    /// Names a `use` binds in a module → (the module where the `use` is, the path it names).
    aliases: BTreeMap<(ModPath, String), (ModPath, Vec<String>)>,
}

impl Crate {
    /// The absolute module path a written path names, or `None` for another crate or a local name.
    fn resolve(&self, scope: &[String], segs: &[String], depth: usize) -> Option<Vec<String>> {
        let first = segs.first()?;
        let mut abs: Vec<String>;
        let rest;
        if first == "crate" {
            abs = vec![];
            rest = &segs[1..];
        } else if first == "self" || first == "super" {
            abs = scope.to_vec();
            let mut k = 0;
            while k < segs.len() && (segs[k] == "super" || segs[k] == "self") {
                if segs[k] == "super" {
                    abs.pop()?;
                }
                k += 1;
            }
            rest = &segs[k..];
        } else {
            let mut child = scope.to_vec();
            child.push(first.clone());
            if self.known.contains_key(&child) {
                abs = scope.to_vec();
                rest = segs;
            } else if let Some((s, target)) = self.aliases.get(&(scope.to_vec(), first.clone())) {
                if depth > 8 {
                    return None;
                }
                let mut t = self.resolve(s, target, depth + 1)?;
                t.extend(segs[1..].iter().cloned());
                return Some(t);
            } else {
                return None;
            }
        }
        abs.extend(rest.iter().cloned());
        Some(abs)
    }

    /// The file node an absolute path lands in, following `use` re-exports;
    /// `None` for the crate root or another crate.
    fn node_of(&self, abs: &[String], depth: usize) -> Option<ModPath> {
        if depth > 8 {
            return None;
        }
        let mut k = abs.len();
        while k > 0 && !self.known.contains_key(&abs[..k]) {
            k -= 1;
        }
        if k < abs.len() {
            if let Some((s, target)) = self.aliases.get(&(abs[..k].to_vec(), abs[k].clone())) {
                let mut t = self.resolve(s, target, 0)?;
                t.extend(abs[k + 1..].iter().cloned());
                if t != abs {
                    return self.node_of(&t, depth + 1);
                }
            }
        }
        if k == 0 {
            return None;
        }
        Some(self.known[&abs[..k]].clone())
    }
}

/// Reads the crate whose sources are in `src` and builds its module graph.
pub fn module_graph(src: &Path) -> Result<Graph, String> {
    let mut paths = Vec::new();
    rs_files(src, &mut paths).map_err(|e| format!("cannot list {}: {e}", src.display()))?;
    paths.sort();
    let mut krate = Crate { files: vec![], known: BTreeMap::new(), aliases: BTreeMap::new() };
    let mut test_only: BTreeSet<ModPath> = BTreeSet::new();
    for p in &paths {
        let rel = p.strip_prefix(src).expect("under src");
        let Some(rel_mod) =
            module_of_file(rel).or_else(|| Some(vec![]).filter(|_| rel.parent() == Some(Path::new(""))))
        else {
            continue;
        };
        let text = std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let mut toks = tokenize(&strip(&text));
        for m in drop_test_items(&mut toks) {
            let mut t = rel_mod.clone();
            t.push(m);
            test_only.insert(t);
        }
        let module = rel_mod;
        let mut refs = Vec::new();
        // (inline module scope, the brace depth that closes it)
        let mut scopes: Vec<(ModPath, i32)> = vec![(module.clone(), -1)];
        let mut depth = 0i32;
        let mut i = 0;
        while i < toks.len() {
            let scope = scopes.last().expect("file scope").0.clone();
            match &toks[i].0 {
                Tok::Punct('{') => depth += 1,
                Tok::Punct('}') => {
                    depth -= 1;
                    if scopes.len() > 1 && scopes.last().expect("scope").1 == depth {
                        scopes.pop();
                    }
                }
                Tok::Ident(kw) if kw == "mod" => {
                    if let (Some(name), true) = (ident(toks.get(i + 1)), is_punct(toks.get(i + 2), '{')) {
                        let mut inner = scope.clone();
                        inner.push(name.to_string());
                        krate.known.insert(inner.clone(), module.clone());
                        scopes.push((inner, depth));
                        depth += 1;
                        i += 3;
                        continue;
                    }
                }
                Tok::Ident(kw) if kw == "use" => {
                    let line = toks[i].1;
                    i += 1;
                    let mut leaves = Vec::new();
                    parse_use_tree(&toks, &mut i, vec![], &mut leaves);
                    while i < toks.len() && !is_punct(toks.get(i), ';') {
                        i += 1;
                    }
                    for l in leaves {
                        if let (Some(a), false) = (&l.alias, l.glob) {
                            krate.aliases.insert((scope.clone(), a.clone()), (scope.clone(), l.segs.clone()));
                        }
                        refs.push(Ref { scope: scope.clone(), segs: l.segs, line });
                    }
                }
                Tok::Ident(first) if toks.get(i + 1).map(|t| &t.0) == Some(&Tok::PathSep) => {
                    let after_sep = i > 0 && matches!(toks[i - 1].0, Tok::PathSep | Tok::Punct('$'));
                    if !after_sep {
                        let line = toks[i].1;
                        let mut segs = vec![first.clone()];
                        let mut j = i + 1;
                        while toks.get(j).map(|t| &t.0) == Some(&Tok::PathSep) {
                            match ident(toks.get(j + 1)) {
                                Some(s) => segs.push(s.to_string()),
                                None => break,
                            }
                            j += 2;
                        }
                        refs.push(Ref { scope: scope.clone(), segs, line });
                        i = j;
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        if !module.is_empty() {
            krate.known.insert(module.clone(), module.clone());
        }
        krate.files.push(FileInfo { rel: rel.display().to_string(), module, refs });
    }
    // Test-only module files (and what lies under them) are no nodes.
    let is_test = |m: &ModPath| test_only.iter().any(|t| m.starts_with(t));
    krate.files.retain(|f| !is_test(&f.module));
    krate.known.retain(|m, _| !is_test(m));
    let mut g = Graph { nodes: BTreeSet::new(), edges: BTreeMap::new() };
    for f in &krate.files {
        if !f.module.is_empty() {
            g.nodes.insert(join(&f.module));
        }
    }
    for f in &krate.files {
        if f.module.is_empty() {
            continue; // the crate root
        }
        for r in &f.refs {
            let Some(abs) = krate.resolve(&r.scope, &r.segs, 0) else { continue };
            let Some(to) = krate.node_of(&abs, 0) else { continue };
            if to != f.module {
                g.edges.entry((join(&f.module), join(&to))).or_default().push(format!(
                    "{}:{} ({})",
                    f.rel,
                    r.line,
                    r.segs.join("::")
                ));
            }
        }
    }
    Ok(g)
}

/// A cycle of the graph as its nodes in order (the first repeated at the end), if any.
pub fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in g.edges.keys() {
        next.entry(a).or_default().push(b);
    }
    // 0 = unseen, 1 = on the stack, 2 = done
    let mut color: BTreeMap<&str, u8> = BTreeMap::new();
    for start in &g.nodes {
        if color.get(start.as_str()).copied().unwrap_or(0) != 0 {
            continue;
        }
        let mut stack: Vec<(&str, usize)> = vec![(start, 0)];
        color.insert(start, 1);
        while let Some(top) = stack.len().checked_sub(1) {
            let (node, k) = stack[top];
            let succ = next.get(node).map(Vec::as_slice).unwrap_or(&[]);
            if k < succ.len() {
                let s = succ[k];
                stack[top].1 += 1;
                match color.get(s).copied().unwrap_or(0) {
                    0 => {
                        color.insert(s, 1);
                        stack.push((s, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|(n, _)| *n == s).expect("on the stack");
                        let mut cycle: Vec<String> =
                            stack[from..].iter().map(|(n, _)| n.to_string()).collect();
                        cycle.push(s.to_string());
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                color.insert(node, 2);
                stack.pop();
            }
        }
    }
    None
}

/// `Err` with the cycle and the references that make it, when the crate's modules are not a DAG.
pub fn check_crate(src: &Path) -> Result<Graph, String> {
    let g = module_graph(src)?;
    if let Some(cycle) = find_cycle(&g) {
        let mut msg = format!("{}: module cycle {}", src.display(), cycle.join(" → "));
        for w in cycle.windows(2) {
            let at = &g.edges[&(w[0].clone(), w[1].clone())];
            msg.push_str(&format!("\n  {} → {}: {}", w[0], w[1], at.join(", ")));
        }
        return Err(msg);
    }
    Ok(g)
}

/// The crates of the workspace: every top-level directory with a `Cargo.toml`
/// and a `src/`, and the root package's own `src/`.
fn crate_sources() -> Vec<(String, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut out = vec![("align".to_string(), root.join("src"))];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("the workspace root is readable")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.join("Cargo.toml").is_file() && p.join("src").is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let name = d.file_name().expect("a name").to_string_lossy().into_owned();
        out.push((name, d.join("src")));
    }
    out
}

#[test]
fn every_crate_s_modules_form_a_dag() {
    let crates = crate_sources();
    let names: Vec<&str> = crates.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["align", "lm", "datasets", "sft", "reward", "rl", "judge"] {
        assert!(names.contains(&want), "crate {want} not found among {names:?}");
    }
    let mut failures = Vec::new();
    let mut modules = 0;
    for (name, src) in &crates {
        match check_crate(src) {
            Ok(g) => {
                modules += g.nodes.len();
                eprintln!("{name}: {} modules, {} edges, no cycle", g.nodes.len(), g.edges.len());
                if name == "lm" {
                    // The checker sees references on the real tree, not only in the synthetic test.
                    for edge in [("checkpoint", "fsio"), ("tokenizer", "fsio"), ("chat", "tokenizer")] {
                        assert!(
                            g.edges.contains_key(&(edge.0.to_string(), edge.1.to_string())),
                            "lm: expected the edge {edge:?}; edges: {:?}",
                            g.edges.keys().collect::<Vec<_>>()
                        );
                    }
                }
            }
            Err(e) => failures.push(e),
        }
    }
    assert!(modules > 30, "only {modules} modules found: is the checker reading the tree?");
    assert!(failures.is_empty(), "modules that import each other in a cycle:\n{}", failures.join("\n"));
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().expect("a parent")).expect("create dirs");
    std::fs::write(p, text).expect("write");
}

fn edge_set(g: &Graph) -> BTreeSet<(String, String)> {
    g.edges.keys().cloned().collect()
}

fn e(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[test]
fn the_checker_finds_a_two_file_cycle() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("src");
    write(&src, "lib.rs", "pub mod a;\npub mod b;\n");
    write(&src, "a.rs", "use crate::b::B;\npub struct A(pub B);\n");
    write(&src, "b.rs", "pub struct B;\n\npub fn make() -> super::a::A {\n    super::a::A(B)\n}\n");
    let err = check_crate(&src).err().expect("a ↔ b must be reported");
    assert!(err.contains("a → b → a") || err.contains("b → a → b"), "{err}");
    assert!(err.contains("a.rs:1") && err.contains("b.rs:3"), "the references are named: {err}");

    // Broken: b no longer names a; the checker passes.
    write(&src, "b.rs", "pub struct B;\n");
    let g = check_crate(&src).expect("no cycle");
    assert_eq!(edge_set(&g), [e("a", "b")].into());
}

#[test]
fn the_checker_ignores_comments_strings_and_tests_and_follows_paths() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let src = tmp.path().join("src");
    write(&src, "lib.rs", "mod a;\nmod b;\nmod c;\nmod d;\npub use d::D;\n");
    // Mentions of b in comments, strings, chars and tests are no references.
    write(
        &src,
        "b.rs",
        r###"//! See crate::a::A.
/* crate::a /* nested crate::a::x */ still a comment: crate::a */
pub fn f() -> &'static str {
    let _c = '"';
    let _q = "\"crate::a::A\"";
    let _r = r#"super::a::A "and" more"#;
    "self::a"
}
#[cfg(test)]
#[allow(unused)]
mod tests {
    use super::super::a::A;
    fn g() { crate::a::A::default(); }
}
#[cfg(test)]
mod helpers;
"###,
    );
    write(&src, "b/helpers.rs", "use crate::a::A;\n");
    // a uses b, c by a plain path after a `use`, and d through the root's re-export.
    write(
        &src,
        "a.rs",
        "use crate::{b, D};\n#[derive(Default)]\npub struct A;\npub fn g() { b::f(); }\n\
         pub fn h() -> D { let x = crate::c::C; D }\n",
    );
    write(
        &src,
        "c/mod.rs",
        "pub struct C;\nmod inner {\n    pub fn k() { super::sub::x(); }\n}\npub mod sub;\n",
    );
    write(&src, "c/sub.rs", "pub fn x() { inner_fn(); }\nfn inner_fn() { let _ = self::x; }\n");
    // d names an inline module's item and another crate's item; neither is an edge.
    write(&src, "d.rs", "pub struct D;\nmod m { pub fn z() {} }\nfn w() { m::z(); ::std::mem::drop(1); }\n");
    let g = check_crate(&src).expect("no cycle");
    assert!(!g.nodes.contains("b::helpers"), "a test-only module is no node: {:?}", g.nodes);
    assert_eq!(edge_set(&g), [e("a", "b"), e("a", "c"), e("a", "d"), e("c", "c::sub")].into());

    // A reference from the submodule to its parent closes a cycle through the directory module.
    write(&src, "c/sub.rs", "pub fn x() { super::C; }\n");
    let err = check_crate(&src).err().expect("c ↔ c::sub");
    assert!(err.contains("c → c::sub → c") || err.contains("c::sub → c → c::sub"), "{err}");
}
