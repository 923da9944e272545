//! Training text: loading a corpus, finding the default one, held-out
//! windows and the n-gram baselines the learning curves are compared with.
//!
//! The core only sees token buffers; this module is where files, UTF-8 and
//! the network meet them. A run's vocabulary is built from the whole corpus
//! (train and validation together), so validation never holds a character
//! the model cannot represent.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use seedling_core::batch::{gather, window_count};
use seedling_core::tokenizer::{Token, Tokenizer};
use sha2::{Digest, Sha256};

/// Text placed between two files of a multi-file corpus, so the last line of
/// one document never runs into the first line of the next.
pub const DOCUMENT_SEPARATOR: &str = "\n\n";

/// Share of the tokens (the last ones) held out for validation. The last
/// 10% is the split the reference workload's baselines are quoted on
/// (ARCHITECTURE.md, "Reference workload RW-256").
pub const VALIDATION_PERCENT: usize = 10;

/// A downloadable reference file pinned by size and SHA-256, so benchmark
/// numbers quoted on it always refer to the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownFile {
    /// File name looked for in each search directory.
    pub name: &'static str,
    /// Where to fetch it when no search directory has it.
    pub url: &'static str,
    /// Lower-case hex SHA-256 of the exact contents.
    pub sha256: &'static str,
}

/// tiny-shakespeare, the default corpus and the text of the reference
/// workload (ARCHITECTURE.md, "Reference workload RW-256").
pub const TINY_SHAKESPEARE: KnownFile = KnownFile {
    name: "tinyshakespeare.txt",
    url: "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256: "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
};

/// The corpus of a run, tokenized and split.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Vocabulary of the whole text; it goes into the run config and every checkpoint.
    pub tokenizer: Tokenizer,
    /// The first 90% of the tokens; minibatches are drawn from here.
    pub train: Vec<Token>,
    /// The last 10%; only the periodic evaluation reads it.
    pub val: Vec<Token>,
    /// The files read, in concatenation order (for logs and `inspect`).
    pub sources: Vec<PathBuf>,
    /// Bytes of text read, separators excluded.
    pub bytes: usize,
}

/// Loads a corpus from files and/or directories.
///
/// Each path is a UTF-8 text file or a directory. A directory contributes its
/// regular files **recursively**, sorted by path (byte order), so the same
/// tree always gives the same corpus; entries whose name starts with `.` are
/// skipped (editor swap files, `.git`), and symbolic links to directories are
/// not followed (no cycles). Files are concatenated in argument order with
/// [`DOCUMENT_SEPARATOR`] between them. The tokenizer is built from the whole
/// text; the first 90% of tokens are for training, the last 10% (rounded up)
/// for validation.
pub fn load_corpus(paths: &[PathBuf]) -> Result<Corpus> {
    if paths.is_empty() {
        bail!("no corpus given: pass --data <file or directory>");
    }
    let mut files = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).with_context(|| format!("corpus path {} cannot be read", p.display()))?;
        if meta.is_dir() {
            let before = files.len();
            collect_dir(p, &mut files)?;
            if files.len() == before {
                bail!("corpus directory {} holds no text files", p.display());
            }
        } else {
            files.push(p.clone());
        }
    }
    let mut text = String::new();
    let mut bytes = 0;
    for (i, f) in files.iter().enumerate() {
        let raw = fs::read(f).with_context(|| format!("cannot read corpus file {}", f.display()))?;
        let s = String::from_utf8(raw).map_err(|e| {
            anyhow!(
                "corpus file {} is not UTF-8 text (invalid byte at offset {})",
                f.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        if i > 0 {
            text.push_str(DOCUMENT_SEPARATOR);
        }
        bytes += s.len();
        text.push_str(&s);
    }
    if bytes == 0 {
        bail!("the corpus is empty ({} file(s), 0 bytes of text)", files.len());
    }
    let tokenizer = Tokenizer::from_corpus(&text).context("cannot build the vocabulary")?;
    if tokenizer.len() < 2 {
        bail!("the corpus has a single distinct character; a language model needs at least two");
    }
    let mut train = tokenizer.encode(&text).context("tokenizing the corpus")?;
    let val_len = train.len().div_ceil(VALIDATION_PERCENT);
    let val = train.split_off(train.len() - val_len);
    Ok(Corpus {
        tokenizer,
        train,
        val,
        sources: files,
        bytes,
    })
}

/// Appends the regular files under `dir`, sorted, recursing into subdirectories.
fn collect_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("cannot list corpus directory {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list corpus directory {}", dir.display()))?;
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        entries.push(e.path());
    }
    entries.sort();
    for p in entries {
        let link = fs::symlink_metadata(&p)?;
        if link.is_dir() {
            collect_dir(&p, out)?;
        } else if fs::metadata(&p).map(|m| m.is_file()).unwrap_or(false) {
            out.push(p);
        }
    }
    Ok(())
}

/// The directories searched for [`TINY_SHAKESPEARE`], in order:
/// `$SEEDLING_DATA_DIR`, `./data`, `../shared/data` (the layout of a
/// development checkout). The user cache is searched after these.
pub fn default_search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("SEEDLING_DATA_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from("data"));
    dirs.push(PathBuf::from("../shared/data"));
    dirs
}

/// `<user cache>/seedling` (`$XDG_CACHE_HOME` or `~/.cache` on Linux), where a
/// downloaded corpus is kept so it is fetched once per machine.
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("seedling"))
}

/// Finds tiny-shakespeare on this machine, downloading it into the user cache
/// the first time if no search directory has it.
///
/// Only a file with the pinned SHA-256 is accepted, so baselines and curves
/// quoted on the default corpus always refer to the same text; any other
/// text is passed explicitly with `--data`.
pub fn find_default_corpus() -> Result<PathBuf> {
    find_known_file(
        &TINY_SHAKESPEARE,
        &default_search_dirs(),
        default_cache_dir().as_deref(),
        &http_get,
    )
}

/// Looks for `file` in `dirs`, then in `cache`, and else downloads it with
/// `download` into `cache`. Split from [`find_default_corpus`] so tests can
/// pass their own directories and a fake downloader.
///
/// A candidate whose SHA-256 differs is skipped with a warning. A download
/// whose SHA-256 differs is refused and nothing is written. The download is
/// written to a temporary file in `cache` and renamed into place, so an
/// interrupted download never leaves a partial file under the final name.
pub fn find_known_file(
    file: &KnownFile,
    dirs: &[PathBuf],
    cache: Option<&Path>,
    download: &dyn Fn(&str) -> Result<Vec<u8>>,
) -> Result<PathBuf> {
    let candidates: Vec<&Path> = dirs.iter().map(PathBuf::as_path).chain(cache).collect();
    for dir in &candidates {
        let path = dir.join(file.name);
        let Ok(bytes) = fs::read(&path) else { continue };
        if sha256_hex(&bytes) == file.sha256 {
            return Ok(path);
        }
        tracing::warn!(
            path = %path.display(),
            "skipping {}: its SHA-256 is not the pinned one", file.name
        );
    }
    let searched = candidates
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let not_found = |why: String| {
        anyhow!(
            "{} not found in [{searched}] and {why}; pass --data <file or directory> to train on local text",
            file.name
        )
    };
    let Some(cache) = cache else {
        return Err(not_found(
            "there is no user cache directory to download it into".into(),
        ));
    };
    tracing::info!(url = file.url, "downloading {}", file.name);
    let bytes = download(file.url).map_err(|e| not_found(format!("downloading it failed: {e:#}")))?;
    let got = sha256_hex(&bytes);
    if got != file.sha256 {
        return Err(not_found(format!(
            "the download from {} has SHA-256 {got}, not the pinned {}",
            file.url, file.sha256
        )));
    }
    let dest = cache.join(file.name);
    write_atomically(cache, &dest, &bytes)
        .map_err(|e| not_found(format!("saving the download to {} failed: {e:#}", dest.display())))?;
    Ok(dest)
}

/// Writes `bytes` to `dest` through a synced temporary file in `dir` and a rename.
fn write_atomically(dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".download-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest)?;
    Ok(())
}

/// Lower-case hex SHA-256.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// HTTP GET with bounded time and size (the only network use outside the
/// training protocol).
fn http_get(url: &str) -> Result<Vec<u8>> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut resp = agent.get(url).call()?;
    Ok(resp.body_mut().with_config().limit(64 << 20).read_to_vec()?)
}

/// Predicted characters per validation window (each window holds 65).
///
/// Fixed rather than the run's training `seq_len`, so that runs training on
/// sequences of any length report the same metric, and every figure in
/// docs/LEARNING.md stays comparable with the ones measured before the
/// training length became free.
pub const VAL_SEQ_LEN: usize = 64;

/// The fixed held-out set for periodic evaluation: up to `max_windows`
/// packed windows of `seq_len + 1` tokens, evenly spaced through `val`.
///
/// The windows depend only on `val`, `seq_len` and `max_windows`, so every
/// evaluation of a run (and of its resumed continuation) measures the same
/// text and the curve shows learning, not sampling noise. Evenly spaced
/// rather than the first ones, so a long validation split is covered end to
/// end even when the budget is small.
pub fn validation_windows(val: &[Token], seq_len: usize, max_windows: usize) -> Vec<Token> {
    let n = window_count(val.len(), seq_len);
    let k = n.min(max_windows);
    let picks: Vec<usize> = (0..k).map(|i| i * n / k).collect();
    gather(val, &picks, seq_len)
}

/// Cross-entropy in nats per character of `val` under an add-one (Laplace)
/// smoothed `n`-gram model counted on `train`: the floor any learned model
/// should beat (n = 1 unigram, n = 2 bigram).
///
/// `P(c | ctx) = (count(ctx c) + 1) / (count(ctx) + vocab)`, where
/// `count(ctx)` counts the contexts followed by some token in `train`. The
/// first `n - 1` tokens of `val` have no full context and are not scored;
/// `n = 0` is the uniform model, `ln(vocab)`. Returns NaN if nothing is scored.
pub fn ngram_baseline(train: &[Token], val: &[Token], vocab: usize, n: usize) -> f64 {
    if n == 0 {
        return (vocab as f64).ln();
    }
    let mut full: HashMap<&[Token], u64> = HashMap::new();
    let mut ctx: HashMap<&[Token], u64> = HashMap::new();
    for w in train.windows(n) {
        *full.entry(w).or_default() += 1;
        *ctx.entry(&w[..n - 1]).or_default() += 1;
    }
    let mut total = 0.0;
    let mut scored = 0usize;
    for w in val.windows(n) {
        let c = full.get(w).copied().unwrap_or(0) as f64;
        let cc = ctx.get(&w[..n - 1]).copied().unwrap_or(0) as f64;
        total -= ((c + 1.0) / (cc + vocab as f64)).ln();
        scored += 1;
    }
    if scored == 0 {
        f64::NAN
    } else {
        total / scored as f64
    }
}

/// The output bias that makes an untrained model predict the training
/// text's character frequencies: add-one log frequencies, centred (softmax
/// ignores a constant). A fresh model otherwise starts at ln V (4.17 nats
/// for tiny-shakespeare) and spends its first ES steps learning what a
/// frequency table gives for free; with this start (the default) the
/// recipe passed bigram after 60.6M forward tokens instead of 97.5M
/// (docs/LEARNING.md).
pub fn unigram_output_bias(train: &[Token], vocab: usize) -> Vec<f32> {
    let mut counts = vec![1.0f64; vocab];
    for &t in train {
        if let Some(c) = counts.get_mut(t as usize) {
            *c += 1.0;
        }
    }
    let logs: Vec<f64> = counts.iter().map(|c| c.ln()).collect();
    let mean = logs.iter().sum::<f64>() / vocab.max(1) as f64;
    logs.iter().map(|l| (l - mean) as f32).collect()
}

/// Writes [`unigram_output_bias`] into `params`' output bias (every row of
/// it, with a per-input head): the one way a fresh run (ES or BPTT) and the
/// recipe's regression test start from it.
pub fn set_unigram_output_bias(layout: &seedling_core::model::Layout, params: &mut [f32], train: &[Token]) {
    let bias = unigram_output_bias(train, layout.vocab());
    for row in params[layout.b_out().range()].chunks_exact_mut(bias.len()) {
        row.copy_from_slice(&bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, bytes).unwrap();
        p
    }

    /// A small pinned file, so the search logic is tested without the real corpus.
    fn known(content: &[u8]) -> KnownFile {
        KnownFile {
            name: "corpus.txt",
            url: "test://corpus",
            sha256: Box::leak(sha256_hex(content).into_boxed_str()),
        }
    }

    fn no_network(_: &str) -> Result<Vec<u8>> {
        bail!("network disabled in tests")
    }

    /// A skewed text: token k with probability about 2^-(k+1).
    fn skewed(n: usize) -> Vec<Token> {
        let mut x = 0x2545_f491_u32;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.trailing_zeros().min(7) as Token
            })
            .collect()
    }

    #[test]
    fn the_unigram_bias_is_the_add_one_frequency_table() {
        let train = skewed(5000);
        let b = unigram_output_bias(&train, 8);
        assert!(b.iter().sum::<f32>().abs() < 1e-4, "{b:?}");
        let z: f64 = b.iter().map(|&x| (x as f64).exp()).sum();
        for (k, &x) in b.iter().enumerate() {
            let count = train.iter().filter(|&&t| t as usize == k).count() as f64;
            let want = (count + 1.0) / (train.len() + 8) as f64;
            assert!(((x as f64).exp() / z - want).abs() < 1e-6, "token {k}");
        }
    }

    #[test]
    fn a_model_with_the_unigram_bias_starts_near_the_unigram_baseline() {
        use seedling_core::config::ModelConfig;
        use seedling_core::{Replica, RunConfig};
        let text = skewed(40_000);
        let (train, val) = text.split_at(30_000);
        let val = &val[..val.len() / 65 * 65];
        let mut cfg = RunConfig::rw256(8);
        cfg.model = ModelConfig {
            vocab: 8,
            hidden: 16,
            layers: 1,
            head: Default::default(),
        };
        let plain = Replica::new(cfg).unwrap();
        let mut params = plain.params.clone();
        params[plain.layout.b_out().range()].copy_from_slice(&unigram_output_bias(train, 8));
        let biased = Replica::from_snapshot(cfg, 0, params, plain.adam.clone()).unwrap();
        let (p, b) = (
            plain.loss(val, 64).unwrap() as f64,
            biased.loss(val, 64).unwrap() as f64,
        );
        let unigram = ngram_baseline(train, val, 8, 1);
        eprintln!("zero bias {p:.3}, unigram bias {b:.3}, unigram baseline {unigram:.3}");
        assert!(b < p - 0.3, "zero bias {p}, unigram bias {b}");
        assert!((b - unigram).abs() < 0.1, "unigram bias {b}, baseline {unigram}");
    }

    #[test]
    fn loads_and_splits_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = write(dir.path(), "a.txt", "abcdefghij".repeat(3).as_bytes());
        let c = load_corpus(std::slice::from_ref(&f)).unwrap();
        assert_eq!(c.tokenizer.len(), 10);
        assert_eq!((c.train.len(), c.val.len()), (27, 3));
        assert_eq!(c.tokenizer.decode(&c.val).unwrap(), "hij");
        assert_eq!(c.sources, vec![f]);
        assert_eq!(c.bytes, 30);
        // Even a tiny corpus keeps at least one validation token.
        let g = write(dir.path(), "b.txt", b"ab");
        let c = load_corpus(&[g]).unwrap();
        assert_eq!((c.train.len(), c.val.len()), (1, 1));
    }

    #[test]
    fn directory_is_sorted_recursive_and_separated() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("corpus");
        write(&dir, "b.txt", b"BB");
        write(&dir, "a.txt", b"AA");
        write(&dir, "sub/c.txt", b"CC");
        write(&dir, ".hidden", b"\xff not text");
        let extra = write(root.path(), "extra.txt", b"EE");
        let c = load_corpus(&[dir, extra]).unwrap();
        let text = c
            .tokenizer
            .decode(&[c.train.clone(), c.val.clone()].concat())
            .unwrap();
        assert_eq!(text, "AA\n\nBB\n\nCC\n\nEE");
        assert_eq!(c.sources.len(), 4);
        assert_eq!(c.bytes, 8);
    }

    #[test]
    fn clear_errors_for_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.txt");
        let e = format!("{:#}", load_corpus(&[missing]).unwrap_err());
        assert!(e.contains("nope.txt"), "{e}");
        let bad = write(dir.path(), "latin1.txt", b"caf\xe9");
        let e = format!("{:#}", load_corpus(&[bad]).unwrap_err());
        assert!(
            e.contains("latin1.txt") && e.contains("not UTF-8") && e.contains("offset 3"),
            "{e}"
        );
        let empty = write(dir.path(), "empty.txt", b"");
        let e = format!("{:#}", load_corpus(&[empty]).unwrap_err());
        assert!(e.contains("empty"), "{e}");
        let one = write(dir.path(), "one.txt", b"aaaa");
        assert!(load_corpus(&[one]).is_err());
        let sub = dir.path().join("emptydir");
        fs::create_dir(&sub).unwrap();
        let e = format!("{:#}", load_corpus(&[sub]).unwrap_err());
        assert!(e.contains("no text files"), "{e}");
        assert!(load_corpus(&[]).unwrap_err().to_string().contains("--data"));
    }

    #[test]
    fn found_in_the_first_directory_that_has_it() {
        let root = tempfile::tempdir().unwrap();
        let content = b"to be or not to be";
        let file = known(content);
        let (d1, d2, d3) = (
            root.path().join("1"),
            root.path().join("2"),
            root.path().join("3"),
        );
        // d1 lacks it, d2 has a wrong copy (skipped), d3 has it, the cache has it too.
        fs::create_dir_all(&d1).unwrap();
        write(&d2, file.name, b"something else");
        write(&d3, file.name, content);
        let cache = root.path().join("cache");
        write(&cache, file.name, content);
        let dirs = [d1, d2, d3.clone()];
        let got = find_known_file(&file, &dirs, Some(&cache), &no_network).unwrap();
        assert_eq!(got, d3.join(file.name));
        // Without the search dirs, the cache is the last place looked.
        let got = find_known_file(&file, &dirs[..2], Some(&cache), &no_network).unwrap();
        assert_eq!(got, cache.join(file.name));
    }

    #[test]
    fn downloads_once_into_the_cache() {
        let root = tempfile::tempdir().unwrap();
        let content = b"first citizen";
        let file = known(content);
        let cache = root.path().join("cache/seedling");
        let calls = Cell::new(0);
        let fetch = |url: &str| {
            assert_eq!(url, "test://corpus");
            calls.set(calls.get() + 1);
            Ok(content.to_vec())
        };
        let got = find_known_file(&file, &[], Some(&cache), &fetch).unwrap();
        assert_eq!(fs::read(&got).unwrap(), content);
        let again = find_known_file(&file, &[], Some(&cache), &fetch).unwrap();
        assert_eq!((got, calls.get()), (again, 1));
        // Only the final file remains: the temporary one was renamed.
        assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);
    }

    #[test]
    fn a_download_with_the_wrong_hash_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let file = known(b"the real text");
        let cache = root.path().join("cache");
        let e = find_known_file(&file, &[], Some(&cache), &|_| Ok(b"tampered".to_vec())).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("SHA-256") && msg.contains("--data"), "{msg}");
        assert!(!cache.join(file.name).exists());
    }

    #[test]
    fn missing_everywhere_and_offline_is_a_one_line_error() {
        let root = tempfile::tempdir().unwrap();
        let file = known(b"x");
        let dirs = [root.path().join("a"), root.path().join("b")];
        let cache = root.path().join("cache");
        let msg = format!(
            "{:#}",
            find_known_file(&file, &dirs, Some(&cache), &no_network).unwrap_err()
        );
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.contains("--data") && msg.contains("network disabled"),
            "{msg}"
        );
        assert!(msg.contains(&*root.path().join("b").to_string_lossy()), "{msg}");
        let msg = format!(
            "{:#}",
            find_known_file(&file, &dirs, None, &no_network).unwrap_err()
        );
        assert!(!msg.contains('\n') && msg.contains("--data"), "{msg}");
    }

    /// Serves one canned HTTP response on loopback and returns its URL.
    fn serve_once(status: &'static str, body: &'static [u8]) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(body).unwrap();
        });
        format!("http://{addr}/input.txt")
    }

    #[test]
    fn http_get_fetches_the_body_and_fails_on_an_error_status() {
        let body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n";
        assert_eq!(http_get(&serve_once("200 OK", body)).unwrap(), body);
        let e = format!("{:#}", http_get(&serve_once("404 Not Found", b"")).unwrap_err());
        assert!(e.contains("404"), "{e}");
    }

    #[test]
    fn validation_windows_are_evenly_spaced_and_fixed() {
        let val: Vec<Token> = (0..100).collect();
        // 25 windows of 4 tokens; 5 of them, every 5th.
        let w = validation_windows(&val, 3, 5);
        assert_eq!(w.len(), 20);
        let starts: Vec<Token> = w.chunks(4).map(|c| c[0]).collect();
        assert_eq!(starts, [0, 20, 40, 60, 80]);
        assert_eq!(w, validation_windows(&val, 3, 5));
        // A budget beyond the split takes every window; none fit in a short split.
        assert_eq!(validation_windows(&val, 3, 1000).len(), 100);
        assert!(validation_windows(&val[..3], 3, 10).is_empty());
        assert!(validation_windows(&val, 3, 0).is_empty());
    }

    #[test]
    fn ngram_baselines_by_hand() {
        // train "aab": unigram P(a) = 3/5, P(b) = 2/5 with add-one over 2 tokens.
        let (train, val) = ([0, 0, 1], [0, 1]);
        let uni = ngram_baseline(&train, &val, 2, 1);
        let want = -((0.6f64).ln() + (0.4f64).ln()) / 2.0;
        assert!((uni - want).abs() < 1e-12, "{uni} vs {want}");
        // Bigrams aa, ab: P(b | a) = (1 + 1) / (2 + 2); only val[1] is scored.
        let bi = ngram_baseline(&train, &val, 2, 2);
        assert!((bi - 2f64.ln()).abs() < 1e-12, "{bi}");
        // An unseen context falls back to uniform: P = 1 / vocab.
        let bi = ngram_baseline(&train, &[1, 0], 2, 2);
        assert!((bi - 2f64.ln()).abs() < 1e-12);
        assert!((ngram_baseline(&train, &val, 7, 0) - 7f64.ln()).abs() < 1e-12);
        assert!(ngram_baseline(&train, &[0], 2, 2).is_nan());
    }
}
