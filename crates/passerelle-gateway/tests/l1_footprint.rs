//! L1's bound is a memory bound: with a counting allocator (every allocation at the size
//! glibc really hands out, chunk header included), the memory held by a full L1 stays
//! within `cache.l1_max_size`, and no entry weighs less than it holds.
//!
//! A test binary of its own: the counting allocator is this process's global allocator.

#![cfg(all(target_os = "linux", target_env = "gnu"))]
#![allow(unsafe_code, clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use passerelle_config::Config;
use passerelle_gateway::cache::entry::{Entry, now_ms};
use passerelle_gateway::cache::key::CacheKey;
use passerelle_gateway::cache::stage::{Outcome, render};
use passerelle_gateway::cache::{Level, ResponseCache};

unsafe extern "C" {
    fn malloc_usable_size(p: *mut u8) -> usize;
}

/// Bytes held now, each allocation counted as glibc's chunk: usable size plus its header.
static HELD: AtomicIsize = AtomicIsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HELD.fetch_add(
                unsafe { malloc_usable_size(p) } as isize + 8,
                Ordering::Relaxed,
            );
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        HELD.fetch_sub(
            unsafe { malloc_usable_size(p) } as isize + 8,
            Ordering::Relaxed,
        );
        unsafe { System.dealloc(p, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.load(Ordering::Relaxed)
}

/// A `/users/{id}` answer as a fill stores it.
fn entry(i: u64) -> Entry {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("etag", HeaderValue::from_static("\"1\""));
    headers.insert(
        "date",
        HeaderValue::from_static("Mon, 01 Jan 2024 00:00:00 GMT"),
    );
    headers.insert("x-served-by", HeaderValue::from_static("users-1"));
    let now = now_ms();
    Entry {
        status: StatusCode::OK,
        headers,
        body: Bytes::from(format!(
            "{{\"id\":{i},\"name\":\"User {i}\",\"email\":\"user{i}@example.com\",\"created_at\":\"2024-01-01T00:00:00Z\",\"version\":1}}"
        )),
        tags: vec![format!("/users/{i}")],
        stored_at: now,
        fresh_until: now + 3_600_000,
        stale_while_revalidate_until: now + 3_600_000,
        stale_if_error_until: now + 3_600_000,
        private_marker: false,
    }
    .compact()
}

const CAP: isize = 4 * 1024 * 1024;

#[test]
fn a_full_l1_holds_no_more_memory_than_its_bound() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cfg = Config::from_toml(
        "test.toml",
        "[cache]\nl1_max_size = \"4MiB\"\nl1_max_ttl = \"1h\"\n\
         [upstreams.o]\nendpoints = [\"127.0.0.1:1\"]\n\
         [[routes]]\nname = \"r\"\npath = \"/users/{id}\"\nupstream = \"o\"\ncache = { ttl = \"1h\" }\n",
        Vec::new(),
    )
    .unwrap();
    let cache = ResponseCache::new(&cfg, None).unwrap();
    cache.l1_upkeep();
    let before = held();
    // Ten times what fits, as a soak over many keys would: L1 evicts down to its bound.
    rt.block_on(async {
        for i in 0..20_000u64 {
            let e = Arc::new(entry(i));
            assert!(e.weight() > 0);
            cache
                .store(
                    None,
                    CacheKey(i.into()),
                    e,
                    cache.generation(),
                    true,
                    &mut None,
                )
                .await;
        }
        cache.l1_upkeep();
        // Every entry still there is served once (which shares its bytes).
        for i in 0..20_000u64 {
            if let Some((e, _)) = cache.lookup(None, CacheKey(i.into()), true).await {
                drop(render(
                    &e,
                    Outcome::Hit(Level::L1),
                    false,
                    None,
                    CacheKey(i.into()),
                ));
            }
        }
    });
    cache.l1_upkeep();
    let figures = cache.describe();
    let (entries, weighted) = (
        figures["l1_entries"].as_i64().unwrap(),
        figures["l1_bytes"].as_i64().unwrap() as isize,
    );
    let real = held() - before;
    eprintln!(
        "L1: {entries} entries, weighted {weighted} B, really held {real} B ({} B an entry)",
        real / entries as isize
    );
    assert!(entries > 1_000, "{entries}");
    assert!(weighted <= CAP, "weighted size {weighted} over the cap");
    assert!(
        real <= CAP,
        "L1 really holds {real} B for a {CAP} B bound ({entries} entries)"
    );
    assert!(
        real >= weighted * 3 / 4,
        "the weight is honest, not wildly high: {real} B held, {weighted} B counted"
    );
}
