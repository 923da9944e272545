//! The files of each crate of the workspace import each other without a
//! circle (`core/src`, `server/src`, `xtask/src`).
//!
//! A circle between files means none of them can be read, tested or moved
//! without the others, so the crate's modules must form layers: the random
//! streams under the config and the model, the perturbation plan above them,
//! and so on. This test parses every file under `core/src` with `syn`,
//! builds the file-level graph of `crate::` and `super::` references, and
//! fails on any cycle, naming it.
//!
//! What counts as an edge from file A to file B:
//! - a `use` or a path in code (macro arguments included) that resolves
//!   through `crate::`, `super::` or `self::` to an item of B, following
//!   `use` re-exports (so `crate::Error`, re-exported by `lib.rs`, is an
//!   edge to `error.rs`);
//! - not a module's use of its own submodules (`forward.rs` calling into
//!   `forward/fused.rs` is one module's inside), nor a visibility such as
//!   `pub(super)`, nor doc comments, nor anything under `#[cfg(test)]`
//!   (unit tests may reach anywhere).
//!
//! [`import_cycles`] takes any crate's source directory; this one file
//! checks every crate whose modules are layered (the wasm client and the
//! test crate are a few files each), so there is one checker to keep.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::punctuated::Punctuated;
use syn::visit::{self, Visit};
use syn::{Attribute, Item, Meta, Token, UseTree};

/// A module path from the crate root (`[]` is `lib.rs` or `main.rs`).
type ModPath = Vec<String>;

/// The file-level import graph of the crate whose sources are under `src`:
/// each file's module path (`"crate"`, `"forward"`, `"forward::fused"`)
/// with the files it imports from.
pub fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut crate_ = Crate::default();
    let mut parsed = Vec::new();
    for path in files {
        let module = file_module(src, &path);
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        crate_.files.insert(module.clone());
        crate_.modules.insert(module.clone());
        collect_modules(&file.items, &module, &mut crate_);
        parsed.push((module, file));
    }
    crate_.resolve_uses();
    let mut graph = BTreeMap::new();
    for (module, file) in &parsed {
        let mut refs = Refs {
            crate_: &crate_,
            stack: module.clone(),
            found: Vec::new(),
        };
        refs.items(&file.items);
        let from = crate_.file_of(module);
        let targets = refs
            .found
            .into_iter()
            .filter_map(|path| crate_.target_file(&path))
            .filter(|to| !to.starts_with(&from[..]))
            .map(|to| name(&to))
            .collect();
        graph.insert(name(&from), targets);
    }
    graph
}

/// A set of files that all reach each other through imports.
#[derive(Debug)]
pub struct Cycle {
    /// Every file of the set, sorted.
    pub files: Vec<String>,
    /// One closed walk through the first of them, `["a", "b", "a"]`.
    pub walk: Vec<String>,
}

impl std::fmt::Display for Cycle {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} (files {})", self.walk.join(" -> "), self.files.join(", "))
    }
}

/// Every import cycle between the files under `src` (one per set of files
/// that reach each other); empty when the files form layers.
pub fn import_cycles(src: &Path) -> Vec<Cycle> {
    let graph = import_graph(src);
    strongly_connected(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1)
        .map(|mut files| {
            files.sort();
            let walk = cycle_through(&graph, &files);
            Cycle { files, walk }
        })
        .collect()
}

#[test]
fn core_src_has_no_import_cycle() {
    assert_no_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}

#[test]
fn server_src_has_no_import_cycle() {
    assert_no_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/src"));
}

#[test]
fn xtask_src_has_no_import_cycle() {
    assert_no_cycle(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src"));
}

/// Fails, naming every cycle, unless the files under `src` form layers.
fn assert_no_cycle(src: &Path) {
    let graph = import_graph(src);
    assert!(
        graph.len() > 5,
        "found only {} files under {}",
        graph.len(),
        src.display()
    );
    let cycles = import_cycles(src);
    assert!(
        cycles.is_empty(),
        "import cycles between files of {}:\n{}",
        src.display(),
        cycles.iter().map(|c| format!("  {c}\n")).collect::<String>()
    );
}

/// The layers this crate is built on: the random streams are a leaf, and the
/// config and the model do not reach up to the perturbation plan.
#[test]
fn the_random_streams_are_a_leaf() {
    let graph = import_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let deps = |m: &str| graph.get(m).unwrap_or_else(|| panic!("no file {m}"));
    assert!(deps("rng").is_empty(), "rng imports {:?}", deps("rng"));
    for m in ["config", "model"] {
        assert!(!deps(m).contains("perturb"), "{m} imports {:?}", deps(m));
    }
    assert!(
        !deps("config").contains("model"),
        "config imports {:?}",
        deps("config")
    );
}

/// The check itself finds cycles, through `super::`, re-exports and macro
/// arguments, and ignores what it should ignore.
#[test]
fn the_check_finds_cycles_and_ignores_tests_and_submodules() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("layering-selftest");
    let _ = fs::remove_dir_all(&dir);
    let write = |rel: &str, text: &str| {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    };
    write(
        "lib.rs",
        "mod a; mod b; mod c; mod d; mod e; pub use a::Thing; pub(crate) fn f() {}",
    );
    // a -> b (use), b -> c (macro argument), c -> a (through the re-export).
    write("a.rs", "use crate::b::B; pub struct Thing;");
    write("b.rs", "pub struct B; fn g() { assert!(crate::c::ok()); }");
    write(
        "c.rs",
        "/// [`crate::d`] in a doc comment is no import.\npub fn ok() -> bool { let _ = crate::Thing; true }",
    );
    // d -> e only in tests; e -> d; d's submodule uses its parent.
    write(
        "d.rs",
        "mod inner; pub(super) fn h() {}\n#[cfg(test)]\nmod tests { use crate::e::E; }\n\
         #[cfg(all(test, feature = \"x\"))]\nfn t() { crate::a::f() }",
    );
    write("d/inner.rs", "use super::h; pub(super) fn i() { h() }");
    write("e.rs", "pub struct E; fn j() { crate::d::h() }");
    let graph = import_graph(&dir);
    let set = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(graph["a"], set(&["b"]));
    assert_eq!(graph["b"], set(&["c"]));
    assert_eq!(graph["c"], set(&["a"]));
    assert_eq!(graph["d"], set(&[]));
    assert_eq!(graph["d::inner"], set(&["d"]));
    assert_eq!(graph["e"], set(&["d"]));
    assert_eq!(graph["crate"], set(&[]));
    let cycles = import_cycles(&dir);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    let c = &cycles[0];
    assert_eq!(c.files, ["a", "b", "c"]);
    assert_eq!(c.walk, ["a", "b", "c", "a"]);
    assert_eq!(c.to_string(), "a -> b -> c -> a (files a, b, c)");
}

// ------------------------------------------------------------------ the crate

/// What the crate declares: its modules (files and inline `mod x { }`),
/// and each module's `use` names, to follow re-exports.
#[derive(Default)]
struct Crate {
    files: BTreeSet<ModPath>,
    modules: BTreeSet<ModPath>,
    /// Each module's `use` leaves as written: `(module, path, name bound)`.
    raw_uses: Vec<(ModPath, ModPath, String)>,
    /// `(module, name)` -> the absolute path the module's `use` gives it
    /// (names from other crates are left out).
    uses: BTreeMap<(ModPath, String), ModPath>,
}

impl Crate {
    /// Fills `uses` from `raw_uses`, once every module is known.
    fn resolve_uses(&mut self) {
        for (module, path, name) in std::mem::take(&mut self.raw_uses) {
            if let Some(abs) = self.absolute(&module, &path) {
                self.uses.insert((module, name), abs);
            }
        }
    }

    /// The file holding module `m` (the longest file-module prefix).
    fn file_of(&self, m: &[String]) -> ModPath {
        (0..=m.len())
            .rev()
            .map(|n| m[..n].to_vec())
            .find(|p| self.files.contains(p))
            .expect("the crate root is a file")
    }

    /// `path` from module `cur` as an absolute path, if it starts with
    /// `crate`, `super` or `self`, or names a submodule of `cur`; `None` for
    /// other crates and local names.
    fn absolute(&self, cur: &[String], path: &[String]) -> Option<ModPath> {
        let mut base = cur.to_vec();
        let mut rest = path;
        match path.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &path[1..];
            }
            Some("super") | Some("self") => {
                while let Some(seg) = rest.first() {
                    match seg.as_str() {
                        "super" => {
                            base.pop()?;
                        }
                        "self" => {}
                        _ => break,
                    }
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                let mut child = cur.to_vec();
                child.push(first.to_string());
                if !self.modules.contains(&child) {
                    return None;
                }
            }
            None => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    /// The file that defines what absolute `path` names, following `use`
    /// re-exports (a name brought in by a glob, or a chain of more than 16
    /// re-exports, stops at the module that holds it). `None` if a
    /// re-export leads out of the crate.
    fn target_file(&self, path: &ModPath) -> Option<ModPath> {
        let mut path = path.clone();
        let mut hops = 0;
        loop {
            let module = (0..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| self.modules.contains(p))?;
            let next = path.get(module.len());
            match next.and_then(|n| self.uses.get(&(module.clone(), n.clone()))) {
                Some(to) if hops < 16 => {
                    let mut followed = to.clone();
                    followed.extend(path[module.len() + 1..].iter().cloned());
                    path = followed;
                    hops += 1;
                }
                _ => return Some(self.file_of(&module)),
            }
        }
    }
}

/// Whether the attributes hold a `#[cfg(..)]` that needs `test`
/// (`cfg(test)`, `cfg(all(test, feature = "x"))`).
fn is_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| match &a.meta {
        Meta::List(l) if l.path.is_ident("cfg") => l.parse_args::<Meta>().is_ok_and(|m| needs_test(&m)),
        _ => false,
    })
}

/// Whether the cfg predicate `m` can hold only in a test build.
fn needs_test(m: &Meta) -> bool {
    let args = |l: &syn::MetaList| {
        l.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
            .map(|p| p.into_iter().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    match m {
        Meta::Path(p) => p.is_ident("test"),
        Meta::List(l) if l.path.is_ident("all") => args(l).iter().any(needs_test),
        Meta::List(l) if l.path.is_ident("any") => {
            let a = args(l);
            !a.is_empty() && a.iter().all(needs_test)
        }
        _ => false,
    }
}

fn item_attrs(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Records the modules declared by `items` (in module `cur`), inline ones
/// recursively, and the names each module's `use`s bring in. Skips
/// `#[cfg(test)]`.
fn collect_modules(items: &[Item], cur: &ModPath, crate_: &mut Crate) {
    let mut uses = Vec::new();
    for item in items.iter().filter(|i| !is_test(item_attrs(i))) {
        match item {
            Item::Mod(m) => {
                let mut child = cur.clone();
                child.push(m.ident.to_string());
                crate_.modules.insert(child.clone());
                if let Some((_, inner)) = &m.content {
                    collect_modules(inner, &child, crate_);
                }
            }
            Item::Use(u) => use_leaves(&u.tree, &mut Vec::new(), &mut uses),
            _ => {}
        }
    }
    // Resolved once every file is read: a `use` may name a module declared
    // anywhere.
    for (path, bound) in uses {
        if let Some(name) = bound {
            crate_.raw_uses.push((cur.clone(), path, name));
        }
    }
}

/// The leaves of a use tree as `(full path, name it binds)`; a glob binds
/// no single name.
fn use_leaves(tree: &UseTree, prefix: &mut Vec<String>, out: &mut Vec<(ModPath, Option<String>)>) {
    match tree {
        UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        UseTree::Name(n) => {
            let name = n.ident.to_string();
            let mut path = prefix.clone();
            if name == "self" {
                out.push((path.clone(), path.last().cloned()));
            } else {
                path.push(name.clone());
                out.push((path, Some(name)));
            }
        }
        UseTree::Rename(r) => {
            let mut path = prefix.clone();
            if r.ident != "self" {
                path.push(r.ident.to_string());
            }
            out.push((path, Some(r.rename.to_string())));
        }
        UseTree::Glob(_) => out.push((prefix.clone(), None)),
        UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, out);
            }
        }
    }
}

/// Collects the absolute paths one file refers to.
struct Refs<'c> {
    crate_: &'c Crate,
    /// The module being visited (inline modules push onto the file's path).
    stack: ModPath,
    found: Vec<ModPath>,
}

impl Refs<'_> {
    fn items(&mut self, items: &[Item]) {
        for item in items.iter().filter(|i| !is_test(item_attrs(i))) {
            self.visit_item(item);
        }
    }

    fn path(&mut self, segments: &[String]) {
        if let Some(abs) = self.crate_.absolute(&self.stack, segments) {
            self.found.push(abs);
        }
    }

    /// `crate :: a :: b` and `super :: ...` runs inside macro arguments.
    fn tokens(&mut self, tokens: TokenStream) {
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if id == "crate" || id == "super" => {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (
                        Some(TokenTree::Punct(a)),
                        Some(TokenTree::Punct(b)),
                        Some(TokenTree::Ident(n)),
                    ) = (tts.get(j), tts.get(j + 1), tts.get(j + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        segs.push(n.to_string());
                        j += 3;
                    }
                    self.path(&segs);
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item(&mut self, item: &'ast Item) {
        if is_test(item_attrs(item)) {
            return;
        }
        visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if let Some((_, items)) = &m.content {
            self.stack.push(m.ident.to_string());
            self.items(items);
            self.stack.pop();
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut leaves = Vec::new();
        use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
        for (path, _) in leaves {
            self.path(&path);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.path(&segs);
        visit::visit_path(self, p);
    }

    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_attribute(&mut self, _: &'ast Attribute) {}

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        visit::visit_path(self, &m.path);
        self.tokens(m.tokens.clone());
    }

    // Test-only functions, impls and fields inside items.
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test(&f.attrs) {
            visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_stmt(&mut self, s: &'ast syn::Stmt) {
        if let syn::Stmt::Item(item) = s
            && is_test(item_attrs(item))
        {
            return;
        }
        visit::visit_stmt(self, s);
    }
}

// ----------------------------------------------------------- files and graphs

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `lib.rs`/`main.rs` -> `[]`, `a/mod.rs` and `a.rs` -> `[a]`, `a/b.rs` -> `[a, b]`.
fn file_module(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|l| l == "mod")
        || matches!(&parts[..], [one] if one == "lib" || one == "main")
    {
        parts.pop();
    }
    parts
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Tarjan's strongly connected components.
fn strongly_connected(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                scc.push(w.to_string());
                if w == v {
                    break;
                }
            }
            s.out.push(scc);
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// One closed walk through the first file of a strongly connected set (a
/// breadth-first search inside it, so the walk is a shortest cycle there).
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, scc: &[String]) -> Vec<String> {
    let members: BTreeSet<&str> = scc.iter().map(String::as_str).collect();
    let start = *members.iter().next().expect("non-empty");
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in graph[v]
            .iter()
            .map(String::as_str)
            .filter(|w| members.contains(w))
        {
            if w == start {
                let mut walk = vec![start.to_string()];
                let mut at = v;
                while at != start {
                    walk.push(at.to_string());
                    at = parent[at];
                }
                walk.push(start.to_string());
                walk.reverse();
                return walk;
            }
            if !parent.contains_key(w) {
                parent.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("a strongly connected set of two or more files has a cycle through each")
}
