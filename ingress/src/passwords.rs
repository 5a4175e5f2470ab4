//! Password hashing (argon2id) on a fixed pool of threads, each owning the memory argon2 works in.
//!
//! argon2 needs 19 MiB per hash on purpose. Allocated per call on tokio's blocking threads, that memory did not come
//! back: glibc raises its mmap threshold after the first such block is freed, later blocks come from the arena of
//! whichever blocking thread ran the hash, and arenas are not trimmed. A flood of wrong-password logins took the
//! ingress from 20 MiB to over 1 GiB (the pod's limit is 512 MiB), and a semaphore in front bounded concurrent
//! hashes, not memory. Options measured against that: `MALLOC_MMAP_THRESHOLD_` (works, but only as an environment
//! setting every deployment must remember), a memory-returning allocator (a new dependency that still allocates and
//! frees 19 MiB per login), and this one: `workers` threads, each allocating its blocks once, on its first hash, and
//! reusing them through argon2's `hash_password_into_with_memory`. Hashing memory is then exactly
//! `workers × 19 MiB`, whatever the allocator and the request mix, and a block that is never freed never moves
//! glibc's threshold.
//!
//! In front of the threads is a bounded queue; when it is full the caller gets [`ApiError::Busy`] at once (503 with
//! `Retry-After`) instead of waiting in a pile that would outlive its request timeout.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::{Output, PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::error::ApiError;

/// The hashes we write: argon2id with the crate's (OWASP's) parameters, 19 MiB, 2 passes.
fn params() -> Params {
    Params::DEFAULT
}

/// A stored hash asking for more memory than this is refused rather than allowed to grow a worker's block without
/// bound (ours ask for 19 MiB).
const MAX_BLOCKS: usize = 64 * 1024;

enum Task {
    Hash(String),
    /// With no stored hash (unknown user) the password is checked against a dummy one, so the answer costs the same.
    Verify {
        password: String,
        stored: Option<String>,
    },
}

enum Outcome {
    Hashed(String),
    Verified(bool),
}

struct Job {
    task: Task,
    reply: tokio::sync::oneshot::Sender<Result<Outcome, String>>,
}

/// The hashing threads and their queue. Dropping the last handle lets the threads finish and exit.
#[derive(Clone)]
pub struct PasswordPool {
    jobs: SyncSender<Job>,
}

impl PasswordPool {
    /// `workers` threads (at least one) behind a queue of `queue` waiting jobs.
    pub fn new(workers: usize, queue: usize) -> Self {
        let (jobs, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || work(&rx))
                .expect("the OS can start a password hashing thread");
        }
        PasswordPool { jobs }
    }

    /// An argon2id PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        match self.run(Task::Hash(password)).await? {
            Outcome::Hashed(h) => Ok(h),
            Outcome::Verified(_) => Err(ApiError::Internal("password pool answered a hash with a check".into())),
        }
    }

    /// Whether `password` matches `stored`; `None` (unknown user) costs the same and is never a match.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, ApiError> {
        match self.run(Task::Verify { password, stored }).await? {
            Outcome::Verified(ok) => Ok(ok),
            Outcome::Hashed(_) => Err(ApiError::Internal("password pool answered a check with a hash".into())),
        }
    }

    async fn run(&self, task: Task) -> Result<Outcome, ApiError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        match self.jobs.try_send(Job { task, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ApiError::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(ApiError::Internal("password threads stopped".into())),
        }
        answer
            .await
            .map_err(|_| ApiError::Internal("a password thread dropped its job".into()))?
            .map_err(ApiError::Internal)
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    let mut blocks: Vec<Block> = Vec::new();
    loop {
        // Holding the lock while waiting is the point: one idle thread waits on the queue, the others on the lock.
        let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let outcome = match job.task {
            Task::Hash(password) => hash(&password, &mut blocks).map(Outcome::Hashed),
            Task::Verify { password, stored } => {
                verify(&password, stored.as_deref(), &mut blocks).map(Outcome::Verified)
            }
        };
        // The caller may have gone (request timeout); nothing to do then.
        let _ = job.reply.send(outcome);
    }
}

/// `blocks` grown to what `params` needs; allocated once per thread and kept.
fn memory(blocks: &mut Vec<Block>, params: &Params) -> Result<(), String> {
    let need = params.block_count();
    if need > MAX_BLOCKS {
        return Err(format!("a stored password hash asks for {need} KiB of memory, more than {MAX_BLOCKS} KiB"));
    }
    if blocks.len() < need {
        blocks.resize(need, Block::default());
    }
    Ok(())
}

fn hash(password: &str, blocks: &mut Vec<Block>) -> Result<String, String> {
    let params = params();
    memory(blocks, &params)?;
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt.decode_b64(&mut salt_bytes).map_err(|e| format!("cannot decode a fresh salt: {e}"))?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), salt_raw, &mut out, &mut blocks[..])
        .map_err(|e| format!("cannot hash a password: {e}"))?;
    let output = Output::new(&out).map_err(|e| format!("cannot encode a password hash: {e}"))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: (&params).try_into().map_err(|e| format!("cannot encode argon2 parameters: {e}"))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

fn verify(password: &str, stored: Option<&str>, blocks: &mut Vec<Block>) -> Result<bool, String> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    let (stored, real) = match stored {
        Some(h) => (h, true),
        None => {
            if DUMMY.get().is_none() {
                let dummy = hash("paystream-dummy-password", blocks)?;
                let _ = DUMMY.set(dummy);
            }
            (DUMMY.get().map(String::as_str).unwrap_or_default(), false)
        }
    };
    // A stored value that is not an argon2 PHC string matches nothing (and says so in no answer).
    let Ok(parsed) = PasswordHash::new(stored) else { return Ok(false) };
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else { return Ok(false) };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else { return Ok(false) };
    let version = parsed.version.map_or(Ok(Version::default()), Version::try_from);
    let (Ok(version), Ok(params)) = (version, Params::try_from(&parsed)) else { return Ok(false) };
    memory(blocks, &params)?;
    let mut salt_bytes = [0u8; 64];
    let Ok(salt_raw) = salt.decode_b64(&mut salt_bytes) else { return Ok(false) };
    let mut out = vec![0u8; expected.len()];
    let params = Params::new(params.m_cost(), params.t_cost(), params.p_cost(), Some(expected.len()))
        .map_err(|e| format!("argon2 parameters of a stored hash: {e}"))?;
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt_raw, &mut out, &mut blocks[..])
        .map_err(|e| format!("cannot check a password: {e}"))?;
    let computed = Output::new(&out).map_err(|e| format!("cannot compare a password hash: {e}"))?;
    // `Output`'s equality is constant-time.
    Ok(computed == expected && real)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::{PasswordHasher as _, PasswordVerifier as _};

    #[tokio::test]
    async fn hashes_verify_only_their_password_and_agree_with_the_argon2_crate() {
        let pool = PasswordPool::new(1, 4);
        let h = pool.hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(pool.verify("correct horse".into(), Some(h.clone())).await.unwrap());
        assert!(!pool.verify("wrong".into(), Some(h.clone())).await.unwrap());
        assert!(!pool.verify("paystream-dummy-password".into(), None).await.unwrap(), "the dummy logs no one in");
        assert!(!pool.verify("x".into(), Some("not a hash".into())).await.unwrap());
        // Hashes written before the pool (by the crate's own API) still verify, and ours verify with the crate.
        let salt = SaltString::generate(&mut OsRng);
        let older = Argon2::default().hash_password(b"older password", &salt).unwrap().to_string();
        assert!(pool.verify("older password".into(), Some(older)).await.unwrap());
        let parsed = PasswordHash::new(&h).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_at_once() {
        let pool = PasswordPool::new(1, 1);
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.verify("guess".into(), None).await })
            })
            .collect();
        let mut busy = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(ok) => assert!(!ok),
                Err(ApiError::Busy) => busy += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        // One thread and one queue slot: of eight at once, at most two run and the rest are told to come back.
        assert!(busy >= 6, "{busy} of 8 refused");
    }
}
