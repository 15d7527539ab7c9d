//! # passerelle-auth
//!
//! What proves who a caller is, with no I/O of its own beyond reading key files and
//! fetching key sets, so that every rule here is unit-tested:
//!
//! - [`api_key`]: the key format (`psl_live_<32 base62>_<crc32>`, a checksum that refuses a
//!   mistyped or forged key before any lookup), generation, and the HMAC under which keys are
//!   stored (never the key itself).
//! - [`jwt`]: token verification with algorithms pinned per issuer, keys from configuration,
//!   a JWKS file or a JWKS URL, and a cache of verified tokens.
//! - [`assertion`]: the identity the gateway hands to upstreams, signed with a secret the
//!   services share, so that a client reaching a service directly cannot claim one.
//! - [`dev`]: the development issuer `passerelle up` sets up (a key pair, minted tokens).
//! - [`Principal`]: the verified caller every scheme produces.

pub mod api_key;
pub mod assertion;
pub mod dev;
pub mod jwt;
mod principal;

pub use principal::{Principal, Scopes};
