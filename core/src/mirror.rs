//! Conversions between the core's plain types and their serde mirrors.
//!
//! The core's types carry no serde derives: the wire (`protocol::schema`)
//! and the checkpoint's metadata (in the server) each keep their own
//! mirrors with their own version, so a change for one never changes the
//! other. These macros write the `From` impls both ways, field by field
//! and variant by variant, for both schemas, so a field or variant added
//! on one side alone does not compile.

/// Writes `From` both ways between a plain enum and its mirror (a wire or a
/// disk schema), variant by variant, so adding a variant to one side alone
/// does not compile.
#[macro_export]
macro_rules! mirror_enum {
    ($plain:ident <-> $mirror:ident { $($v:ident $({ $($f:ident),* })?),* $(,)? }) => {
        impl From<$plain> for $mirror {
            fn from(x: $plain) -> Self {
                match x {
                    $($plain::$v $({ $($f),* })? => $mirror::$v $({ $($f),* })?,)*
                }
            }
        }
        impl From<$mirror> for $plain {
            fn from(x: $mirror) -> Self {
                match x {
                    $($mirror::$v $({ $($f),* })? => $plain::$v $({ $($f),* })?,)*
                }
            }
        }
    };
}

/// Writes `From` both ways between a plain struct and its mirror (a wire or
/// a disk schema), field by field (each field converted with `into`), so a
/// field added to one side alone does not compile.
#[macro_export]
macro_rules! mirror_struct {
    ($plain:ident <-> $mirror:ident { $($f:ident),* $(,)? }) => {
        impl From<$plain> for $mirror {
            #[allow(clippy::useless_conversion)]
            fn from(x: $plain) -> Self {
                let $plain { $($f),* } = x;
                $mirror { $($f: $f.into()),* }
            }
        }
        impl From<$mirror> for $plain {
            #[allow(clippy::useless_conversion)]
            fn from(x: $mirror) -> Self {
                let $mirror { $($f),* } = x;
                $plain { $($f: $f.into()),* }
            }
        }
    };
}
