//! `paystream dlq`: list and redrive dead letters of a running system (see `bus::dlq`).
//!
//! ```text
//! paystream dlq list [--consumer C] [--json]
//! paystream dlq redrive ID
//! paystream dlq redrive --all [--consumer C]
//! ```
//!
//! Letters of the notifier (`notifier-miniprogram`, `notifier-sms`) have their `failed` notification reopened
//! (`notifier::ledger::reopen_failed`) before they are republished; otherwise the notifier would acknowledge the
//! redriven message as a duplicate of a final outcome and send nothing.

use std::time::Duration;

use bus::DeadLetter;
use bus::dlq::{self, DlqError};
use bus::events::{MiniprogramNotify, SmsNotify};
use clap::{Args, Subcommand};

use crate::{config::Config, roles::Infra};

#[derive(Debug, Args)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters: ID, consumer, age, deliveries, reason, original subject.
    List {
        /// Only the letters of this consumer (e.g. processor-payment, notifier-sms).
        #[arg(long)]
        consumer: Option<String>,
        /// One JSON array (with payloads and all metadata) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their original subject and remove them from the DLQ.
    Redrive {
        /// The letter's ID, as `dlq list` shows it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every letter (of --consumer).
        #[arg(long)]
        all: bool,
        /// With --all: only this consumer's letters.
        #[arg(long, requires = "all")]
        consumer: Option<String>,
    },
}

pub async fn run(cfg: &Config, args: DlqArgs) -> anyhow::Result<()> {
    let infra = Infra::connect(cfg).await?;
    let publisher = &infra.publisher;
    match args.command {
        DlqCommand::List { consumer, json } => {
            let letters = dlq::list(publisher.jetstream(), publisher.topology(), consumer.as_deref()).await?;
            if json {
                let rows: Vec<serde_json::Value> = letters.iter().map(letter_json).collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", table(&letters));
            }
            Ok(())
        }
        DlqCommand::Redrive { id: Some(id), .. } => {
            let out = dlq::redrive_with(publisher, id, async |l: &DeadLetter| prepare(&infra.pool, l).await).await?;
            println!("{}", redriven_line(&out));
            Ok(())
        }
        DlqCommand::Redrive { id: None, consumer, .. } => {
            let report = dlq::redrive_all_with(publisher, consumer.as_deref(), async |l: &DeadLetter| {
                prepare(&infra.pool, l).await
            })
            .await?;
            for out in &report.redriven {
                println!("{}", redriven_line(out));
            }
            for refused in &report.refused {
                eprintln!("left in the DLQ: {refused}");
            }
            println!("{} redriven, {} left in the DLQ", report.redriven.len(), report.refused.len());
            if report.refused.iter().any(|e| !matches!(e, DlqError::NotFound(_))) {
                anyhow::bail!("{} dead letter(s) were not redriven", report.refused.len());
            }
            Ok(())
        }
    }
}

/// Before a notifier letter goes back: reopen its `failed` notification, or the redrive would be a no-op.
async fn prepare(pool: &storage::PgPool, letter: &DeadLetter) -> Result<(), String> {
    let key = match letter.consumer.as_str() {
        notifier::MINIPROGRAM_CONSUMER => letter.decode::<MiniprogramNotify>()?.payload.0.key("miniprogram"),
        notifier::SMS_CONSUMER => letter.decode::<SmsNotify>()?.payload.0.key("sms"),
        _ => return Ok(()),
    };
    let mut conn = pool.get().await.map_err(|e| format!("database unavailable: {e}"))?;
    let reopened =
        notifier::ledger::reopen_failed(&mut conn, &key).await.map_err(|e| format!("cannot reopen {key}: {e}"))?;
    if reopened {
        println!("notification {key}: failed → retrying");
    }
    Ok(())
}

fn redriven_line(o: &bus::RedriveOutcome) -> String {
    format!(
        "redriven {} ({}) → {} as stream seq {}, msg id {}{}",
        o.seq,
        o.consumer,
        o.subject,
        o.stream_seq,
        o.msg_id,
        if o.duplicate { " (already there: redriven moments ago)" } else { "" }
    )
}

fn letter_json(l: &DeadLetter) -> serde_json::Value {
    let payload = serde_json::from_slice::<serde_json::Value>(&l.payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&l.payload).into_owned()));
    serde_json::json!({
        "id": l.seq,
        "consumer": l.consumer,
        "subject": l.subject,
        "reason": l.reason,
        "deliveries": l.deliveries,
        "failed_at": l.failed_at.to_rfc3339(),
        "age_seconds": l.age.as_secs(),
        "original_msg_id": l.original_msg_id,
        "original_stream": l.original_stream,
        "original_stream_seq": l.original_stream_seq,
        "payload": payload,
    })
}

fn table(letters: &[DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    let rows: Vec<[String; 6]> = letters
        .iter()
        .map(|l| {
            [
                l.seq.to_string(),
                l.consumer.clone(),
                age(l.age),
                l.deliveries.to_string(),
                shorten(&l.reason, 72),
                if l.subject.is_empty() { "?".into() } else { l.subject.clone() },
            ]
        })
        .collect();
    let head = ["ID", "CONSUMER", "AGE", "DELIVERIES", "REASON", "SUBJECT"];
    let mut width = head.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i == 5 {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(head);
    for r in &rows {
        out.push_str(&line([&r[0], &r[1], &r[2], &r[3], &r[4], &r[5]]));
    }
    out.push_str(&format!("{} dead letter(s)\n", rows.len()));
    out
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_owned() } else { s.chars().take(max - 1).collect::<String>() + "…" }
}

/// `45s`, `12m03s`, `5h07m`, `3d04h`.
fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(Duration::from_secs(45)), "45s");
        assert_eq!(age(Duration::from_secs(12 * 60 + 3)), "12m03s");
        assert_eq!(age(Duration::from_secs(5 * 3600 + 7 * 60)), "5h07m");
        assert_eq!(age(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d04h");
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
