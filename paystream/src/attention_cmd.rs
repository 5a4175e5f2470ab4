//! `paystream attention`: orders the automatic passes gave up on until a person looks at them.
//!
//! ```text
//! paystream attention list [--json]
//! paystream attention resolve ORDER_SN
//! ```
//!
//! Today the timeout closer is the pass that hands orders over (`processors::timeout::ATTENTION_AFTER`): an unpaid
//! order past its deadline it could not close, for a reason that is not an outage. The reason says where to look.
//! `resolve` gives the order back to the passes with a clean slate, after the cause is dealt with (a dead letter
//! redriven, WeChat's transaction settled on the merchant platform, …).

use clap::{Args, Subcommand};
use storage::OrderSn;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct AttentionArgs {
    #[command(subcommand)]
    pub command: AttentionCommand,
}

#[derive(Debug, Subcommand)]
pub enum AttentionCommand {
    /// Show the orders waiting for a person: order, since when, attempts, reason.
    List {
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Give an order back to the automatic passes once its cause is dealt with.
    Resolve {
        /// The order's serial number (HSO…).
        order_sn: String,
    },
}

pub async fn run(cfg: &Config, args: AttentionArgs) -> anyhow::Result<()> {
    let mut conn = storage::connect(&cfg.database).await?;
    match args.command {
        AttentionCommand::List { json } => {
            let rows = storage::orders::attention(&mut conn).await?;
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "order_sn": r.sn,
                            "trade_state": r.trade_state,
                            "attempts": r.attempts,
                            "since": r.since,
                            "reason": r.reason,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            if rows.is_empty() {
                println!("no orders wait for a person");
                return Ok(());
            }
            println!("{:<25}  {:<20}  {:>8}  reason", "order", "since", "attempts");
            for r in &rows {
                println!("{:<25}  {:<20}  {:>8}  {}", r.sn, r.since.format("%Y-%m-%d %H:%M:%S"), r.attempts, r.reason);
            }
            println!("{} waiting; once dealt with: paystream attention resolve ORDER_SN", rows.len());
        }
        AttentionCommand::Resolve { order_sn } => {
            let sn =
                OrderSn::parse(&order_sn).map_err(|e| anyhow::anyhow!("{order_sn:?} is not an order number: {e}"))?;
            if !storage::orders::resolve_attention(&mut conn, &sn).await? {
                anyhow::bail!("order {sn} is not waiting for a person (see paystream attention list)");
            }
            println!("order {sn} is back in the automatic passes");
        }
    }
    Ok(())
}
