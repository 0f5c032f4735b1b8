/// Declares a wire enumeration: a Rust enum with an explicit integer representation, a
/// checked conversion from the raw integer (unknown values are a [`crate::DecodeError`]) and
/// the conversion back.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $repr:ty as $field:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $value:expr ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value ),+
        }

        impl $name {
            /// Every value this protocol version defines, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Decodes the raw value, rejecting values this protocol version does not define.
            pub fn from_raw(raw: $repr) -> Result<Self, $crate::DecodeError> {
                match raw {
                    $( v if v == $value => Ok($name::$variant), )+
                    other => Err($crate::DecodeError::UnknownValue {
                        field: $field,
                        value: other as u64,
                    }),
                }
            }

            /// The raw wire value.
            pub const fn raw(self) -> $repr {
                self as $repr
            }
        }

        impl TryFrom<$repr> for $name {
            type Error = $crate::DecodeError;
            fn try_from(raw: $repr) -> Result<Self, Self::Error> {
                Self::from_raw(raw)
            }
        }

        impl From<$name> for $repr {
            fn from(value: $name) -> $repr {
                value as $repr
            }
        }
    };
}

/// Decodes a flags field, rejecting bits the flags type does not define.
macro_rules! decode_flags {
    ($ty:ty, $raw:expr, $field:literal) => {{
        let raw = $raw;
        <$ty>::from_bits(raw).ok_or($crate::DecodeError::ReservedBits {
            field: $field,
            bits: (raw & !<$ty>::all().bits()) as u64,
        })
    }};
}
