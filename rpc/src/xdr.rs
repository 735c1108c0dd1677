//! XDR (RFC 4506) as libvirt's RPC bodies use it: big-endian 4-byte units, strings and
//! opaque data padded to 4 bytes, optional values as a 0/1 word, arrays as a count, and
//! libvirt's typed parameters and error body.
//!
//! The decoder never panics and never allocates more than the input can hold: every length
//! is checked against what is left and against the array or string limit of the protocol
//! (`<N>` in libvirt's `.x` files), so hostile input is an [`XdrError`].

use std::fmt;

/// Why a body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum XdrError {
    /// The body ended inside a value.
    Truncated,
    /// A string or array is longer than the protocol allows.
    TooLong {
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A string that is not UTF-8.
    NotUtf8,
    /// An optional value's marker or a boolean that is neither 0 nor 1, or a typed
    /// parameter of an unknown type.
    BadValue(u32),
    /// Bytes left after the last value.
    Trailing(usize),
}

impl fmt::Display for XdrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XdrError::Truncated => f.write_str("the body ends inside a value"),
            XdrError::TooLong { len, max } => write!(f, "length {len} above the limit of {max}"),
            XdrError::NotUtf8 => f.write_str("a string is not UTF-8"),
            XdrError::BadValue(v) => write!(f, "unexpected value {v}"),
            XdrError::Trailing(n) => write!(f, "{n} bytes after the last value"),
        }
    }
}

impl std::error::Error for XdrError {}

/// Builds a body.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

impl Encoder {
    /// An empty body.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// The bytes so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// `unsigned int`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `int`.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `unsigned hyper`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `hyper`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// `double`.
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
        self
    }

    /// `string` (or `opaque<>`): length, bytes, zero padding.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self.buf.extend(std::iter::repeat_n(0, padding(v.len())));
        self
    }

    /// `string`.
    pub fn string(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    /// `string *` (libvirt's `remote_string`): 0, or 1 and the string.
    pub fn opt_string(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            None => self.u32(0),
            Some(s) => self.u32(1).string(s),
        }
    }

    /// A `virTypedParameter` array.
    pub fn typed_params(&mut self, params: &[TypedParam]) -> &mut Self {
        self.u32(params.len() as u32);
        for p in params {
            self.string(&p.field);
            match &p.value {
                Value::Int(v) => self.i32(1).i32(*v),
                Value::UInt(v) => self.i32(2).u32(*v),
                Value::LLong(v) => self.i32(3).i64(*v),
                Value::ULLong(v) => self.i32(4).u64(*v),
                Value::Double(v) => self.i32(5).f64(*v),
                Value::Boolean(v) => self.i32(6).i32(i32::from(*v)),
                Value::String(v) => self.i32(7).string(v),
            };
        }
        self
    }
}

/// Reads a body, front to back.
#[derive(Debug, Clone)]
pub struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    /// Reads `buf`.
    pub fn new(buf: &'a [u8]) -> Decoder<'a> {
        Decoder { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], XdrError> {
        if self.buf.len() < n {
            return Err(XdrError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// `unsigned int`.
    ///
    /// # Errors
    ///
    /// [`XdrError::Truncated`].
    pub fn u32(&mut self) -> Result<u32, XdrError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `int`.
    ///
    /// # Errors
    ///
    /// [`XdrError::Truncated`].
    pub fn i32(&mut self) -> Result<i32, XdrError> {
        self.u32().map(|v| v as i32)
    }

    /// `unsigned hyper`.
    ///
    /// # Errors
    ///
    /// [`XdrError::Truncated`].
    pub fn u64(&mut self) -> Result<u64, XdrError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// `hyper`.
    ///
    /// # Errors
    ///
    /// [`XdrError::Truncated`].
    pub fn i64(&mut self) -> Result<i64, XdrError> {
        self.u64().map(|v| v as i64)
    }

    /// `double`.
    ///
    /// # Errors
    ///
    /// [`XdrError::Truncated`].
    pub fn f64(&mut self) -> Result<f64, XdrError> {
        self.u64().map(f64::from_bits)
    }

    /// `opaque<max>` / `string<max>` bytes.
    ///
    /// # Errors
    ///
    /// [`XdrError::TooLong`] above `max`, [`XdrError::Truncated`].
    pub fn bytes(&mut self, max: u32) -> Result<&'a [u8], XdrError> {
        let len = self.u32()?;
        if len > max {
            return Err(XdrError::TooLong { len, max });
        }
        let len = len as usize;
        let v = self.take(len)?;
        self.take(padding(len))?;
        Ok(v)
    }

    /// `string<max>`.
    ///
    /// # Errors
    ///
    /// As [`bytes`](Decoder::bytes), and [`XdrError::NotUtf8`].
    pub fn string(&mut self, max: u32) -> Result<String, XdrError> {
        let b = self.bytes(max)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| XdrError::NotUtf8)
    }

    /// `string<max> *`.
    ///
    /// # Errors
    ///
    /// As [`string`](Decoder::string), and [`XdrError::BadValue`] for a marker other than 0/1.
    pub fn opt_string(&mut self, max: u32) -> Result<Option<String>, XdrError> {
        match self.u32()? {
            0 => Ok(None),
            1 => self.string(max).map(Some),
            v => Err(XdrError::BadValue(v)),
        }
    }

    /// An array's count, checked against `max` and against what is left (each item takes at
    /// least `min_item` bytes), so a hostile count cannot make the caller allocate.
    ///
    /// # Errors
    ///
    /// [`XdrError::TooLong`], [`XdrError::Truncated`].
    pub fn count(&mut self, max: u32, min_item: usize) -> Result<usize, XdrError> {
        let n = self.u32()?;
        if n > max {
            return Err(XdrError::TooLong { len: n, max });
        }
        if (n as usize).saturating_mul(min_item.max(1)) > self.buf.len() {
            return Err(XdrError::Truncated);
        }
        Ok(n as usize)
    }

    /// A `virTypedParameter` array of at most `max` entries (field names at most
    /// [`FIELD_LENGTH`] bytes, string values at most [`STRING_MAX`]).
    ///
    /// # Errors
    ///
    /// [`XdrError::BadValue`] for an unknown type or a boolean other than 0/1; length and
    /// truncation errors.
    pub fn typed_params(&mut self, max: u32) -> Result<Vec<TypedParam>, XdrError> {
        let n = self.count(max, 12)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let field = self.string(FIELD_LENGTH)?;
            let value = match self.i32()? {
                1 => Value::Int(self.i32()?),
                2 => Value::UInt(self.u32()?),
                3 => Value::LLong(self.i64()?),
                4 => Value::ULLong(self.u64()?),
                5 => Value::Double(self.f64()?),
                6 => match self.u32()? {
                    0 => Value::Boolean(false),
                    1 => Value::Boolean(true),
                    v => return Err(XdrError::BadValue(v)),
                },
                7 => Value::String(self.string(STRING_MAX)?),
                t => return Err(XdrError::BadValue(t as u32)),
            };
            out.push(TypedParam { field, value });
        }
        Ok(out)
    }

    /// Checks that nothing is left.
    ///
    /// # Errors
    ///
    /// [`XdrError::Trailing`].
    pub fn finish(self) -> Result<(), XdrError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(XdrError::Trailing(self.buf.len()))
        }
    }
}

/// `VIR_TYPED_PARAM_FIELD_LENGTH`: a field name's limit.
pub const FIELD_LENGTH: u32 = 80;
/// `REMOTE_STRING_MAX`: libvirt's limit for a string on the wire.
pub const STRING_MAX: u32 = 4_194_304;

/// A typed parameter's value (`virTypedParameterType`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `VIR_TYPED_PARAM_INT` (1).
    Int(i32),
    /// `VIR_TYPED_PARAM_UINT` (2).
    UInt(u32),
    /// `VIR_TYPED_PARAM_LLONG` (3).
    LLong(i64),
    /// `VIR_TYPED_PARAM_ULLONG` (4).
    ULLong(u64),
    /// `VIR_TYPED_PARAM_DOUBLE` (5).
    Double(f64),
    /// `VIR_TYPED_PARAM_BOOLEAN` (6).
    Boolean(bool),
    /// `VIR_TYPED_PARAM_STRING` (7).
    String(String),
}

/// One `virTypedParameter`: a field name and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedParam {
    /// The name (`minWorkers`, ...).
    pub field: String,
    /// The value.
    pub value: Value,
}

impl TypedParam {
    /// A parameter.
    pub fn new(field: &str, value: Value) -> TypedParam {
        TypedParam {
            field: field.to_owned(),
            value,
        }
    }
}

/// libvirt's error reply body (`virNetMessageError`), as libvirtd fills it for an error of
/// `code` in `domain`: level 2 (error), no domain or network, `str1` the message, int1 and
/// int2 -1.
pub fn error_body(code: i32, domain: i32, message: &str) -> Vec<u8> {
    let mut e = Encoder::new();
    e.i32(code)
        .i32(domain)
        .opt_string(Some(message))
        .i32(2)
        .u32(0)
        .opt_string(Some(message))
        .opt_string(None)
        .opt_string(None)
        .i32(-1)
        .i32(-1)
        .u32(0);
    e.into_bytes()
}

/// What [`error_body`] encodes, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    /// `virErrorNumber`.
    pub code: i32,
    /// `virErrorDomain`.
    pub domain: i32,
    /// The message, if any.
    pub message: Option<String>,
}

/// Decodes a `virNetMessageError`.
///
/// # Errors
///
/// Any [`XdrError`]: truncated, too long, or trailing bytes.
pub fn decode_error(body: &[u8]) -> Result<ErrorBody, XdrError> {
    let mut d = Decoder::new(body);
    let code = d.i32()?;
    let domain = d.i32()?;
    let message = d.opt_string(STRING_MAX)?;
    let _level = d.i32()?;
    let _dom = d.u32()?;
    for _ in 0..3 {
        d.opt_string(STRING_MAX)?;
    }
    let _int1 = d.i32()?;
    let _int2 = d.i32()?;
    let _net = d.u32()?;
    d.finish()?;
    Ok(ErrorBody {
        code,
        domain,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_padded_to_four_bytes() {
        let mut e = Encoder::new();
        e.string("libvirtd");
        assert_eq!(e.clone().into_bytes(), b"\0\0\0\x08libvirtd");
        e.string("admin");
        let bytes = e.into_bytes();
        assert_eq!(&bytes[12..], b"\0\0\0\x05admin\0\0\0");
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.string(16).unwrap(), "libvirtd");
        assert_eq!(d.string(16).unwrap(), "admin");
        d.finish().unwrap();
    }

    #[test]
    fn typed_params_round_trip() {
        let params = vec![
            TypedParam::new("minWorkers", Value::UInt(5)),
            TypedParam::new("unix_user_id", Value::Int(-1)),
            TypedParam::new("readonly", Value::Boolean(false)),
            TypedParam::new("unix_user_name", Value::String("root".into())),
            TypedParam::new("big", Value::ULLong(u64::MAX)),
            TypedParam::new("neg", Value::LLong(i64::MIN)),
            TypedParam::new("d", Value::Double(0.5)),
        ];
        let mut e = Encoder::new();
        e.typed_params(&params);
        let bytes = e.into_bytes();
        // The first one, by hand: count, "minWorkers" (10 bytes + 2 padding), type 2, 5.
        assert_eq!(&bytes[..4], &7u32.to_be_bytes());
        assert_eq!(&bytes[4..8], &10u32.to_be_bytes());
        assert_eq!(&bytes[8..20], b"minWorkers\0\0");
        assert_eq!(&bytes[20..28], &[0, 0, 0, 2, 0, 0, 0, 5]);
        let mut d = Decoder::new(&bytes);
        assert_eq!(d.typed_params(32).unwrap(), params);
        d.finish().unwrap();
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic_or_an_allocation() {
        // A count of 2^32-1 parameters in a 4-byte body.
        let mut d = Decoder::new(&[0xff, 0xff, 0xff, 0xff]);
        assert!(d.typed_params(u32::MAX).is_err());
        // Above the protocol's limit.
        let mut d = Decoder::new(&[0, 0, 0, 33]);
        assert_eq!(
            d.typed_params(32),
            Err(XdrError::TooLong { len: 33, max: 32 })
        );
        // A string longer than the body.
        let mut d = Decoder::new(&[0, 0, 1, 0, b'a']);
        assert_eq!(d.string(STRING_MAX), Err(XdrError::Truncated));
        // Missing padding.
        let mut d = Decoder::new(&[0, 0, 0, 1, b'a']);
        assert_eq!(d.string(STRING_MAX), Err(XdrError::Truncated));
        // Bad markers and types.
        assert_eq!(
            Decoder::new(&[0, 0, 0, 2]).opt_string(9),
            Err(XdrError::BadValue(2))
        );
        let mut e = Encoder::new();
        e.u32(1).string("x").i32(9).u32(0);
        assert_eq!(
            Decoder::new(&e.into_bytes()).typed_params(32),
            Err(XdrError::BadValue(9))
        );
        assert_eq!(
            Decoder::new(&[0xc3, 0x28, 0, 0]).u32().unwrap(),
            0xc328_0000
        );
        let mut e = Encoder::new();
        e.bytes(&[0xc3, 0x28]);
        assert_eq!(
            Decoder::new(&e.into_bytes()).string(9),
            Err(XdrError::NotUtf8)
        );
        assert_eq!(Decoder::new(&[0; 5]).finish(), Err(XdrError::Trailing(5)));
        // Every prefix of a valid body fails cleanly.
        let mut e = Encoder::new();
        e.typed_params(&[TypedParam::new("s", Value::String("value".into()))]);
        let full = e.into_bytes();
        for cut in 0..full.len() {
            assert!(
                Decoder::new(&full[..cut]).typed_params(32).is_err(),
                "{cut}"
            );
        }
    }

    #[test]
    fn error_bodies_round_trip() {
        let body = error_body(
            8,
            0,
            "invalid argument: minWorkers cannot be larger than maxWorkers",
        );
        let e = decode_error(&body).unwrap();
        assert_eq!(e.code, 8);
        assert_eq!(e.domain, 0);
        assert_eq!(
            e.message.as_deref(),
            Some("invalid argument: minWorkers cannot be larger than maxWorkers")
        );
        assert!(decode_error(&body[..body.len() - 1]).is_err());
    }
}
