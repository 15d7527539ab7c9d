//! Commands sent together whose keys live in different cluster slots.
//!
//! On one server (or a Sentinel primary) a [`Batch`] is one pipeline: one round trip, the
//! commands executed in order. A Redis Cluster refuses a pipeline whose keys span slots
//! (each slot may live on another node), so there a batch becomes one pipeline per slot,
//! all sent at once, which still costs one round trip per node. Order matters across
//! slots only at [`Batch::then`] boundaries: every command before one has been answered
//! before any command after it is sent. That is how "tag the entry before storing it" and
//! "publish after deleting" stay true on a cluster.
//!
//! Scripts go by SHA (`EVALSHA`); on `NOSCRIPT` (a restarted or failed-over node) the
//! batch's scripts are loaded and the group that failed is sent once more, so a batch must
//! be safe to run twice: each of its commands idempotent.
//!
//! Cost, as [`crate::stats`] counts it: one round trip per batch on one server or a
//! Sentinel primary (the pipeline goes through [`Conn`], which counts it), and one per
//! stage on a cluster, however many slots it spans: the stage's pipelines go out together
//! on the cluster connection itself (uncounted), and the stage is counted once, with all
//! its commands. A `NOSCRIPT` reload adds its `SCRIPT LOAD`s and the resend.

use futures_util::future::join_all;
use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, Script, ServerErrorKind, Value};

use crate::connection::Conn;
use crate::keys::hash_slot;
use crate::stats;

/// Commands to send together; see the module doc.
#[derive(Default)]
pub(crate) struct Batch {
    entries: Vec<Entry>,
    scripts: Vec<&'static Script>,
    stage: usize,
}

struct Entry {
    cmd: Cmd,
    /// What a cluster is sent instead (`SPUBLISH` for `PUBLISH`).
    on_cluster: Option<Cmd>,
    /// The slot of the command's key (or channel).
    slot: u16,
    keep: bool,
    stage: usize,
}

/// `EVALSHA <sha> <number of keys> <keys...>`; the caller appends the arguments.
pub(crate) fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(script.get_hash()).arg(keys.len()).arg(keys);
    c
}

impl Batch {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// A command on `key` whose answer is returned.
    pub(crate) fn cmd(&mut self, key: &str, cmd: Cmd) -> &mut Self {
        self.push(hash_slot(key), cmd, None, true)
    }

    /// A command on `key` whose answer is dropped.
    pub(crate) fn cmd_ignored(&mut self, key: &str, cmd: Cmd) -> &mut Self {
        self.push(hash_slot(key), cmd, None, false)
    }

    /// A script call ([`evalsha`]) on `key` (its keys share `key`'s slot), answer returned.
    pub(crate) fn script(&mut self, script: &'static Script, key: &str, cmd: Cmd) -> &mut Self {
        self.note_script(script);
        self.cmd(key, cmd)
    }

    /// [`Batch::script`] whose answer is dropped.
    pub(crate) fn script_ignored(
        &mut self,
        script: &'static Script,
        key: &str,
        cmd: Cmd,
    ) -> &mut Self {
        self.note_script(script);
        self.cmd_ignored(key, cmd)
    }

    /// A message on `channel` (answer dropped): `PUBLISH` on one server, `SPUBLISH` (sharded:
    /// only the channel's shard carries it) on a cluster.
    pub(crate) fn publish(&mut self, channel: &str, payload: String) -> &mut Self {
        let mut plain = redis::cmd("PUBLISH");
        plain.arg(channel).arg(&payload);
        let mut sharded = redis::cmd("SPUBLISH");
        sharded.arg(channel).arg(payload);
        self.push(hash_slot(channel), plain, Some(sharded), false)
    }

    /// Everything added so far is answered before anything added next is sent.
    pub(crate) fn then(&mut self) -> &mut Self {
        self.stage += 1;
        self
    }

    fn push(&mut self, slot: u16, cmd: Cmd, on_cluster: Option<Cmd>, keep: bool) -> &mut Self {
        self.entries.push(Entry {
            cmd,
            on_cluster,
            slot,
            keep,
            stage: self.stage,
        });
        self
    }

    fn note_script(&mut self, script: &'static Script) {
        if !self
            .scripts
            .iter()
            .any(|s| s.get_hash() == script.get_hash())
        {
            self.scripts.push(script);
        }
    }

    /// Sends the batch; the answers of the kept commands, in the order they were added.
    pub(crate) async fn send(self, conn: &Conn) -> Result<Vec<Value>, redis::RedisError> {
        if self.entries.is_empty() {
            return Ok(Vec::new());
        }
        let Batch {
            entries, scripts, ..
        } = self;
        // The commands are moved into the pipelines, never copied: a cache entry's value
        // can be a megabyte.
        let Conn::Cluster(cluster) = conn else {
            let mut p = Pipeline::new();
            for e in entries {
                p.add_command(e.cmd);
                if !e.keep {
                    p.ignore();
                }
            }
            return send_group(&mut conn.clone(), &p, &scripts).await;
        };
        let keep: Vec<bool> = entries.iter().map(|e| e.keep).collect();
        let mut answers: Vec<Option<Value>> = vec![None; entries.len()];
        // Per stage, in order: the slots' pipelines and which entry each command is.
        let mut stages: Vec<Vec<(u16, Pipeline, Vec<usize>)>> = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            if stages.len() <= e.stage {
                stages.resize_with(e.stage + 1, Vec::new);
            }
            let groups = &mut stages[e.stage];
            let at = match groups.iter().position(|(slot, _, _)| *slot == e.slot) {
                Some(at) => at,
                None => {
                    groups.push((e.slot, Pipeline::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            let (_, p, members) = &mut groups[at];
            p.add_command(e.on_cluster.unwrap_or(e.cmd));
            members.push(i);
        }
        // The cluster connection itself, not `conn`: a stage is one wait however many
        // slots' pipelines it sends, so it is counted here once, not once per pipeline.
        let inner = cluster.connection();
        for groups in stages {
            if groups.is_empty() {
                continue;
            }
            stats::record(groups.iter().map(|(_, p, _)| p.len()).sum());
            let sends = groups.iter().map(|(_, p, _)| {
                let mut conn = inner.clone();
                let scripts = &scripts;
                async move {
                    let (result, reloaded) = send_reloading(&mut conn, p, scripts).await;
                    if reloaded {
                        // Uncounted on this connection: each SCRIPT LOAD, then the resend.
                        for _ in 0..scripts.len() {
                            stats::record(1);
                        }
                        stats::record(p.len());
                    }
                    result
                }
            });
            let results = join_all(sends).await;
            for ((_, _, members), result) in groups.iter().zip(results) {
                for (&i, v) in members.iter().zip(result?) {
                    answers[i] = Some(v);
                }
            }
        }
        Ok(keep
            .into_iter()
            .zip(answers)
            .filter(|(keep, _)| *keep)
            .map(|(_, v)| v.unwrap_or(Value::Nil))
            .collect())
    }
}

/// Sends one pipeline; on `NOSCRIPT`, loads `scripts` (on every primary, for a cluster)
/// and sends it once more. Counted in [`crate::stats`] when `conn` is a [`Conn`].
pub(crate) async fn send_group<C: ConnectionLike>(
    conn: &mut C,
    p: &Pipeline,
    scripts: &[&'static Script],
) -> Result<Vec<Value>, redis::RedisError> {
    send_reloading(conn, p, scripts).await.0
}

/// [`send_group`], also saying whether the scripts were loaded (and the pipeline resent).
async fn send_reloading<C: ConnectionLike>(
    conn: &mut C,
    p: &Pipeline,
    scripts: &[&'static Script],
) -> (Result<Vec<Value>, redis::RedisError>, bool) {
    match p.query_async(conn).await {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            let resent = async {
                for s in scripts {
                    s.load_async(conn).await?;
                }
                p.query_async(conn).await
            };
            (resent.await, true)
        }
        r => (r, false),
    }
}
