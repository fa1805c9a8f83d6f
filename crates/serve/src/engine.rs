//! The decode loop: one thread owns the model and a [`Batcher`]; requests' sequences queue for
//! it, join the running batch at the next step while it has room, and stream their tokens back.
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use preftune_model::batcher::{Batcher, RowSampling, Step};
use preftune_model::Model;
use tokio::sync::mpsc::UnboundedSender;

/// One sequence to sample: its prompt, its settings, and where its tokens go (a request's
/// sequences may share one channel: each token carries its sequence's id). Dropping the
/// receiving end cancels it at its next token.
pub struct Job {
    pub prompt: Vec<u32>,
    pub sampling: RowSampling,
    pub tokens: UnboundedSender<Step>,
}

/// The server is full: running and queued sequences would exceed the capacity.
#[derive(Debug)]
pub struct Full {
    pub capacity: usize,
}

/// A handle on the decode thread (cheap to clone).
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Vec<(u64, Job)>>,
    load: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    capacity: usize,
}

impl Engine {
    /// Starts the decode thread: at most `max_batch` sequences decode together, and at most
    /// `capacity` are running or queued; `bf16`: bf16 products over f32 weights.
    pub fn start(model: Model, pad: u32, max_batch: usize, capacity: usize, bf16: bool) -> Self {
        let (tx, rx) = mpsc::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let l = load.clone();
        std::thread::Builder::new()
            .name("preftune-decode".into())
            .spawn(move || {
                // Per thread, so set here: the weights never change while the server runs, so
                // each is packed (or copied to bf16) once, on first use.
                let _bf16 = preftune_model::ops::Bf16Scope::new(bf16);
                let _packed = preftune_model::ops::PackedWeights::new();
                run(model, pad, max_batch.max(1), rx, &l)
            })
            .expect("spawning the decode thread");
        Engine {
            tx,
            load,
            next_id: Arc::new(AtomicU64::new(0)),
            capacity: capacity.max(1),
        }
    }

    /// Queues `jobs` together (all or none) and returns their ids, in order, or says the server
    /// is full.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<Vec<u64>, Full> {
        let n = jobs.len();
        let capacity = self.capacity;
        self.load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                (l + n <= capacity).then_some(l + n)
            })
            .map_err(|_| Full { capacity })?;
        let jobs: Vec<(u64, Job)> = jobs
            .into_iter()
            .map(|j| (self.next_id.fetch_add(1, Ordering::Relaxed), j))
            .collect();
        let ids = jobs.iter().map(|(id, _)| *id).collect();
        if self.tx.send(jobs).is_err() {
            // The decode thread is gone (a panic): nothing will answer.
            self.load.fetch_sub(n, Ordering::SeqCst);
            return Err(Full { capacity });
        }
        Ok(ids)
    }

    /// Sequences running or queued.
    pub fn load(&self) -> usize {
        self.load.load(Ordering::SeqCst)
    }
}

fn run(
    model: Model,
    pad: u32,
    max_batch: usize,
    rx: mpsc::Receiver<Vec<(u64, Job)>>,
    load: &AtomicUsize,
) {
    let mut batch = match Batcher::new(&model, pad) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("serve: cannot start decoding: {e}");
            return;
        }
    };
    let mut queue: VecDeque<(u64, Job)> = VecDeque::new();
    let mut senders: HashMap<u64, UnboundedSender<Step>> = HashMap::new();
    let done = |n: usize| {
        load.fetch_sub(n, Ordering::SeqCst);
    };
    loop {
        if batch.is_empty() && queue.is_empty() {
            match rx.recv() {
                Ok(j) => queue.extend(j),
                Err(_) => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            queue.extend(j);
        }
        // Sequences whose client left while they queued go now.
        queue.retain(|(_, j)| {
            let open = !j.tokens.is_closed();
            if !open {
                done(1);
            }
            open
        });
        let room = max_batch.saturating_sub(batch.len()).min(queue.len());
        if room > 0 {
            let joining: Vec<(u64, Job)> = queue.drain(..room).collect();
            let mut seqs = Vec::with_capacity(joining.len());
            for (id, j) in joining {
                seqs.push((id, j.prompt, j.sampling));
                senders.insert(id, j.tokens);
            }
            let ids: Vec<u64> = seqs.iter().map(|s| s.0).collect();
            if let Err(e) = batch.admit(seqs) {
                // Their clients see the stream end without a finish and answer 500.
                eprintln!("serve: admitting {} sequences failed: {e}", ids.len());
                for id in ids {
                    senders.remove(&id);
                }
                done(room);
            }
        }
        if batch.is_empty() {
            continue;
        }
        match batch.step() {
            Ok(steps) => {
                for s in steps {
                    let (id, finished) = (s.id, s.finish.is_some());
                    let gone = senders.get(&id).is_none_or(|tx| tx.send(s).is_err());
                    if finished || gone {
                        senders.remove(&id);
                        done(1);
                        if !finished {
                            if let Err(e) = batch.cancel(id) {
                                eprintln!("serve: cancelling a sequence failed: {e}");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                eprintln!("serve: a decode step failed: {e}");
                done(senders.len());
                senders.clear();
                batch = match Batcher::new(&model, pad) {
                    Ok(b) => b,
                    Err(_) => return,
                };
            }
        }
    }
}
