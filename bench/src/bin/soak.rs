//! A long mixed load at a fixed fraction of saturation, reporting each minute.
//!
//! First it measures saturation: `--connections` keep-alive connections send the mix (MLP
//! tensors, with every `--image-every`-th request a JPEG for the image classifier) back to
//! back for `--calibrate` seconds. Then it sends the same mix at `--fraction` of that rate for
//! `--minutes`, open-loop: each request has a scheduled start and its latency counts from
//! there, so a server that falls behind shows it instead of slowing the load down. Beside it, a
//! management cycle (register, predict, scale up and down, unregister) runs every
//! `--management-every` seconds. Each minute prints one JSON line (requests, errors, p50 and
//! p99 per kind, the server's RSS); the run ends with a summary line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::json;
use tchserve_bench::http::{check_loopback, post, read_response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Parser)]
struct Args {
    /// Inference listener, host:port (loopback only).
    #[arg(long, default_value = "127.0.0.1:8080")]
    inference: String,
    /// Management listener, host:port (loopback only).
    #[arg(long, default_value = "127.0.0.1:8081")]
    management: String,
    /// The server's process id, for its RSS.
    #[arg(long)]
    pid: u32,
    /// Minutes of soak.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Seconds of saturation measurement before the soak.
    #[arg(long, default_value_t = 30)]
    calibrate: u64,
    /// Fraction of the saturation rate to send.
    #[arg(long, default_value_t = 0.8)]
    fraction: f64,
    /// Connections sending predictions.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Route of the tensor model.
    #[arg(long, default_value = "/predictions/mlp")]
    mlp_path: String,
    /// A JSON body for the tensor model.
    #[arg(long)]
    mlp_body: std::path::PathBuf,
    /// Route of the image classifier.
    #[arg(long, default_value = "/predictions/image")]
    image_path: String,
    /// A JPEG for the image classifier.
    #[arg(long)]
    image_body: std::path::PathBuf,
    /// Every n-th prediction is an image.
    #[arg(long, default_value_t = 4)]
    image_every: u64,
    /// Archive (in the model store) the management cycle registers.
    #[arg(long, default_value = "mlp.mar")]
    archive: String,
    /// Seconds between management cycles.
    #[arg(long, default_value_t = 10)]
    management_every: u64,
}

/// The kinds of call the soak makes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Mlp = 0,
    Image = 1,
    Management = 2,
}

const KINDS: [&str; 3] = ["mlp", "image", "management"];

/// One minute's calls.
#[derive(Debug, Default, Clone)]
struct Minute {
    latencies_us: [Vec<u32>; 3],
    errors: [u64; 3],
}

/// Every minute's calls, by the minute a call was scheduled in.
#[derive(Debug)]
struct Record {
    start: Instant,
    minutes: Mutex<Vec<Minute>>,
}

impl Record {
    fn add(&self, scheduled: Instant, kind: Kind, ok: bool) {
        let minute = scheduled.saturating_duration_since(self.start).as_secs() as usize / 60;
        let latency = scheduled.elapsed().as_micros() as u32;
        let mut m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() <= minute {
            m.resize(minute + 1, Minute::default());
        }
        if ok {
            m[minute].latencies_us[kind as usize].push(latency);
        } else {
            m[minute].errors[kind as usize] += 1;
        }
    }

    fn take(&self, minute: usize) -> Minute {
        let mut m = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        m.get_mut(minute).map(std::mem::take).unwrap_or_default()
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    f64::from(sorted[i]) / 1000.0
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The two prediction requests, as bytes.
struct Requests {
    mlp: Vec<u8>,
    image: Vec<u8>,
    image_every: u64,
}

impl Requests {
    fn pick(&self, n: u64) -> (Kind, &[u8]) {
        if n.is_multiple_of(self.image_every) {
            (Kind::Image, &self.image)
        } else {
            (Kind::Mlp, &self.mlp)
        }
    }
}

async fn connect(addr: &str) -> anyhow::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One call on a kept-alive connection, reconnecting once if the server closed it.
async fn call(
    conn: &mut Option<TcpStream>,
    addr: &str,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<u16> {
    for _ in 0..2 {
        if conn.is_none() {
            *conn = Some(connect(addr).await?);
        }
        let Some(stream) = conn.as_mut() else {
            continue;
        };
        let sent = stream.write_all(request).await;
        match sent {
            Ok(()) => match read_response(stream, buf).await {
                Ok(status) => return Ok(status),
                Err(_) => *conn = None,
            },
            Err(_) => *conn = None,
        }
    }
    anyhow::bail!("the connection failed twice")
}

/// Saturation: the mix back to back on every connection; requests per second.
async fn calibrate(args: &Args, requests: Arc<Requests>) -> anyhow::Result<f64> {
    let end = Instant::now() + Duration::from_secs(args.calibrate);
    let warm = Instant::now() + Duration::from_secs(args.calibrate.min(10) / 2);
    let tasks: Vec<_> = (0..args.connections)
        .map(|c| {
            let (addr, requests) = (args.inference.clone(), Arc::clone(&requests));
            tokio::spawn(async move {
                let (mut conn, mut buf, mut done) = (None, vec![0u8; 1 << 16], 0u64);
                let mut n = c as u64;
                while Instant::now() < end {
                    let (_, request) = requests.pick(n);
                    n += 1;
                    let status = call(&mut conn, &addr, request, &mut buf).await?;
                    anyhow::ensure!(status == 200, "calibration answered {status}");
                    if Instant::now() >= warm {
                        done += 1;
                    }
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / end.duration_since(warm).as_secs_f64())
}

/// One management cycle: every call must succeed.
async fn management_cycle(
    args: &Args,
    mlp_body: &[u8],
    n: u64,
    buf: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let name = format!("soak_{n}");
    let get = |method: &str, path: String| {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
            .into_bytes()
    };
    let steps = [
        (
            args.management.as_str(),
            get(
                "POST",
                format!(
                    "/models?url={}&model_name={name}&initial_workers=1&synchronous=true",
                    args.archive
                ),
            ),
        ),
        (
            args.inference.as_str(),
            post(
                &format!("/predictions/{name}"),
                "application/json",
                "",
                mlp_body,
            ),
        ),
        (
            args.management.as_str(),
            get(
                "PUT",
                format!("/models/{name}?min_worker=2&synchronous=true"),
            ),
        ),
        (
            args.management.as_str(),
            get(
                "PUT",
                format!("/models/{name}?min_worker=1&synchronous=true"),
            ),
        ),
        (
            args.management.as_str(),
            get("DELETE", format!("/models/{name}")),
        ),
    ];
    for (addr, request) in steps {
        let mut conn = None;
        let status = call(&mut conn, addr, &request, buf).await?;
        anyhow::ensure!(
            status == 200,
            "{}: {status}",
            String::from_utf8_lossy(&request[..request.len().min(80)])
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    check_loopback(&args.inference)?;
    check_loopback(&args.management)?;
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| p.display().to_string());
    let requests = Arc::new(Requests {
        mlp: post(
            &args.mlp_path,
            "application/json",
            "",
            &read(&args.mlp_body)?,
        ),
        image: post(&args.image_path, "image/jpeg", "", &read(&args.image_body)?),
        image_every: args.image_every.max(1),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(soak(args, requests))
}

async fn soak(args: Args, requests: Arc<Requests>) -> anyhow::Result<()> {
    let saturation = calibrate(&args, Arc::clone(&requests)).await?;
    let rate = saturation * args.fraction;
    println!(
        "{}",
        json!({"saturation_rps": saturation.round(), "rate_rps": rate.round(),
               "connections": args.connections, "image_every": args.image_every,
               "minutes": args.minutes})
    );
    let record = Arc::new(Record {
        start: Instant::now(),
        minutes: Mutex::new(Vec::new()),
    });
    let end = record.start + Duration::from_secs(args.minutes * 60);
    // Each connection keeps its own schedule, offset from the others so the load is even.
    let period = Duration::from_secs_f64(args.connections as f64 / rate);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let (addr, requests, record) = (
            args.inference.clone(),
            Arc::clone(&requests),
            Arc::clone(&record),
        );
        let first = record.start + period.mul_f64(c as f64 / args.connections as f64);
        tasks.push(tokio::spawn(async move {
            let (mut conn, mut buf) = (None, vec![0u8; 1 << 16]);
            let mut n = c as u64;
            let mut at = first;
            while at < end {
                tokio::time::sleep_until(at.into()).await;
                let (kind, request) = requests.pick(n);
                let ok = matches!(call(&mut conn, &addr, request, &mut buf).await, Ok(200));
                record.add(at, kind, ok);
                n += 1;
                at += period;
            }
        }));
    }
    {
        let (record, args) = (Arc::clone(&record), args.clone());
        // Read once here: the cycle runs on the async threads.
        let mlp_body = std::fs::read(&args.mlp_body)?;
        let args_management = args.management_every;
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            let mut at = record.start + Duration::from_secs(args_management);
            while at < end {
                tokio::time::sleep_until(at.into()).await;
                let result = management_cycle(&args, &mlp_body, n, &mut buf).await;
                if let Err(e) = &result {
                    eprintln!("management cycle {n}: {e}");
                }
                record.add(at, Kind::Management, result.is_ok());
                n += 1;
                at += Duration::from_secs(args_management);
            }
        }));
    }

    let mut rss = Vec::new();
    let mut p99s = Vec::new();
    let mut errors = 0;
    for minute in 0..args.minutes as usize {
        // Reported a few seconds after the minute ends, once its last calls have answered.
        let report_at = record.start + Duration::from_secs((minute as u64 + 1) * 60 + 5);
        tokio::time::sleep_until(report_at.into()).await;
        let mut m = record.take(minute);
        let mem = rss_mb(args.pid);
        rss.push(mem);
        let mut line = serde_json::Map::new();
        line.insert("minute".into(), json!(minute + 1));
        for (k, name) in KINDS.iter().enumerate() {
            m.latencies_us[k].sort_unstable();
            line.insert(
                (*name).into(),
                json!({"requests": m.latencies_us[k].len() as u64 + m.errors[k],
                       "errors": m.errors[k],
                       "p50_ms": percentile(&m.latencies_us[k], 0.50),
                       "p99_ms": percentile(&m.latencies_us[k], 0.99)}),
            );
            errors += m.errors[k];
        }
        let mut predictions: Vec<u32> = m.latencies_us[..2].concat();
        predictions.sort_unstable();
        let p99 = percentile(&predictions, 0.99);
        p99s.push(p99);
        line.insert("p99_ms".into(), json!(p99));
        line.insert("rss_mb".into(), json!((mem * 10.0).round() / 10.0));
        println!("{}", serde_json::Value::Object(line));
    }
    for t in tasks {
        t.await?;
    }
    // RSS growth after the first five minutes (allocators and caches settle by then), and the
    // p99 of the first five measured minutes against the last five.
    let settled = rss.get(4).or(rss.first()).copied().unwrap_or(0.0);
    let last = rss.last().copied().unwrap_or(0.0);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (early, late) = (
        mean(&p99s[..p99s.len().min(5)]),
        mean(&p99s[p99s.len().saturating_sub(5)..]),
    );
    println!(
        "{}",
        json!({"summary": {
            "minutes": args.minutes,
            "saturation_rps": saturation.round(),
            "rate_rps": rate.round(),
            "errors": errors,
            "rss_mb_minute_5": (settled * 10.0).round() / 10.0,
            "rss_mb_last": (last * 10.0).round() / 10.0,
            "rss_growth_after_minute_5_pct": ((last - settled) / settled.max(1.0) * 1000.0).round() / 10.0,
            "p99_ms_first_5_minutes": (early * 100.0).round() / 100.0,
            "p99_ms_last_5_minutes": (late * 100.0).round() / 100.0,
        }})
    );
    Ok(())
}
