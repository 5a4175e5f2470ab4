//! Statements prepared once per connection and reused.
//!
//! diesel marks raw SQL (`sql_query`), every INSERT and every UPDATE as unsafe to cache, so diesel-async prepares
//! them again on every call: a Parse/Describe round trip before the Bind/Execute one, and a fresh plan each time.
//! That doubled the round trips of the payment path. [`prepared`] wraps such a statement so that the connection's
//! statement cache keeps it by its SQL text (and bind types): the second call on a connection is one round trip.
//!
//! Safe because the cache key is the full SQL text: a statement whose text varies (an `IN` list, a changeset with
//! optional columns, a multi-row insert of another length) simply becomes another entry. Only wrap statements
//! whose distinct texts are few (fixed SQL, or a length bounded by a batch size), or the cache grows.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::QueryResult;

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
#[must_use = "queries are only executed when calling `execute`, `load` or `get_result`"]
pub struct Prepared<Q>(Q);

/// `query`, cached by its SQL text on the connection that runs it.
pub fn prepared<Q>(query: Q) -> Prepared<Q> {
    Prepared(query)
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    // No static id: the cache then keys the statement by its SQL text.
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}
