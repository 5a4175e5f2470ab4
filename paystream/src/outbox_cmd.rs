//! `paystream outbox`: outbox rows NATS refused for good, which the relays parked (`storage::outbox::park`).
//!
//! ```text
//! paystream outbox parked [--json]
//! paystream outbox retry ID... | --all
//! ```
//!
//! A parked row holds back the later events of its aggregate (so their order holds) and nothing else. Fix the cause
//! (today the only one is a row larger than NATS's `max_payload`: raise it on the servers), then retry: the relays
//! publish the row and what waits behind it, or park it again with the new reason.

use clap::{Args, Subcommand};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub command: OutboxCommand,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Show parked rows: id, when parked, subject, aggregate, size, events waiting behind it, reason.
    Parked {
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Let the relays try parked rows again.
    Retry {
        /// Row ids, as `outbox parked` shows them.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every parked row.
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(cfg: &Config, args: OutboxArgs) -> anyhow::Result<()> {
    let mut conn = storage::connect(&cfg.database).await?;
    match args.command {
        OutboxCommand::Parked { json } => {
            let rows = storage::outbox::parked(&mut conn).await?;
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "id": r.id,
                            "event_id": r.event_id,
                            "subject": r.subject,
                            "aggregate": r.aggregate,
                            "payload_bytes": r.payload_bytes,
                            "created": r.create_time,
                            "parked": r.parked_at,
                            "waiting_behind": r.waiting_behind,
                            "reason": r.reason,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if rows.is_empty() {
                println!("no parked outbox rows");
                return Ok(());
            }
            println!(
                "{:>10}  {:<20}  {:<18}  {:<34}  {:>10}  {:>7}  reason",
                "id", "parked", "subject", "aggregate", "bytes", "behind"
            );
            for r in &rows {
                println!(
                    "{:>10}  {:<20}  {:<18}  {:<34}  {:>10}  {:>7}  {}",
                    r.id,
                    r.parked_at.format("%Y-%m-%d %H:%M:%S"),
                    r.subject,
                    r.aggregate,
                    r.payload_bytes,
                    r.waiting_behind,
                    r.reason
                );
            }
            println!("{} parked; fix the cause, then: paystream outbox retry ID… | --all", rows.len());
        }
        OutboxCommand::Retry { ids, all } => {
            let ids = (!all).then_some(ids);
            let n = storage::outbox::unpark(&mut conn, ids.as_deref()).await?;
            if let Some(ids) = &ids
                && n < ids.len()
            {
                anyhow::bail!(
                    "{n} of {} rows unparked: the others are not parked (see paystream outbox parked)",
                    ids.len()
                );
            }
            println!("{n} rows unparked; the relays try them again");
        }
    }
    Ok(())
}
