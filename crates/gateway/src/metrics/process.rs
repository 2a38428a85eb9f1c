//! The standard `process_*` metrics (as every Prometheus client library names them), read
//! from `/proc/self` at each scrape. Elsewhere than Linux, and for any file that cannot be
//! read, the metric is left out rather than reported wrong.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Reads `/proc/self` when scraped.
#[derive(Debug, Default)]
pub(super) struct Process;

/// What `/proc/self/stat` says (fields after the command name, which may hold spaces).
struct Stat {
    cpu_seconds: f64,
    threads: i64,
    start_ticks: f64,
    virtual_bytes: i64,
}

fn stat(ticks: f64) -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields from the state (field 3) on; `fields[n - 3]` is field n of proc(5).
    let fields: Vec<&str> = text.get(text.rfind(')')? + 2..)?.split(' ').collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    Some(Stat {
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        threads: field(20)? as i64,
        start_ticks: field(22)?,
        virtual_bytes: field(23)? as i64,
    })
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn resident_bytes() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Boot time, in seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

/// The soft limit on open files (`Max open files` of `/proc/self/limits`).
fn max_fds() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<V>,
) -> Result<(), std::fmt::Error> {
    let Some(v) = value else { return Ok(()) };
    let metric = ConstGauge::new(v);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let stat = stat(ticks);
        if let Some(s) = &stat {
            let cpu = ConstCounter::new(s.cpu_seconds);
            let help = "Total user and system CPU time spent in seconds";
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                help,
                None,
                cpu.metric_type(),
            )?)?;
        }
        let start = stat
            .as_ref()
            .zip(boot_time())
            .map(|(s, boot)| boot + s.start_ticks / ticks);
        let start_help = "Start time of the process since unix epoch in seconds";
        gauge(
            &mut encoder,
            "process_start_time_seconds",
            start_help,
            start,
        )?;
        let rss_help = "Resident memory size in bytes";
        gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            rss_help,
            resident_bytes(),
        )?;
        let vm = stat.as_ref().map(|s| s.virtual_bytes);
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            vm,
        )?;
        gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors",
            open_fds(),
        )?;
        let max_help = "Maximum number of open file descriptors";
        gauge(&mut encoder, "process_max_fds", max_help, max_fds())?;
        let threads = stat.as_ref().map(|s| s.threads);
        gauge(
            &mut encoder,
            "process_threads",
            "Number of OS threads in the process",
            threads,
        )
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let s = stat(ticks).expect("stat");
        assert!(s.threads >= 1 && s.virtual_bytes > 0);
        assert!(resident_bytes().expect("rss") > 0);
        assert!(open_fds().expect("fds") >= 3);
        assert!(max_fds().expect("max fds") >= open_fds().unwrap());
        let start = boot_time().unwrap() + s.start_ticks / ticks;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{start} vs {now}"
        );
    }
}
