//! The guests' out-of-band channel: one line of text per message over TCP on loopback, as
//! perftest and `ibv_rc_pingpong` exchange QP numbers, GIDs, addresses and keys over a socket.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::TcpStream;
use std::time::Duration;

use vrdma_proto::Gid;

/// What one guest tells the other about its side of the RC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// QP number.
    pub qpn: u32,
    /// Port GID.
    pub gid: Gid,
    /// Address of the registered buffer.
    pub addr: u64,
    /// Its remote key.
    pub rkey: u32,
    /// Its length.
    pub len: u64,
}

impl Hello {
    /// The line sent.
    pub fn encode(&self) -> String {
        let gid: String = self.gid.0.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "HELLO qpn={:#x} gid={gid} addr={:#x} rkey={:#x} len={}",
            self.qpn, self.addr, self.rkey, self.len
        )
    }

    /// Parses a received line.
    pub fn decode(line: &str) -> Result<Hello, String> {
        let bad = || format!("the other guest sent {line:?}, not its QP information");
        let mut words = line.split_whitespace();
        if words.next() != Some("HELLO") {
            return Err(bad());
        }
        let (mut qpn, mut gid, mut addr, mut rkey, mut len) = (None, None, None, None, None);
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(bad)?;
            let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok();
            match key {
                "qpn" => qpn = hex(value).and_then(|v| u32::try_from(v).ok()),
                "rkey" => rkey = hex(value).and_then(|v| u32::try_from(v).ok()),
                "addr" => addr = hex(value),
                "len" => len = value.parse().ok(),
                "gid" if value.len() == 32 => {
                    let mut g = [0u8; 16];
                    for (i, b) in g.iter_mut().enumerate() {
                        *b = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
                    }
                    gid = Some(Gid(g));
                }
                _ => return Err(bad()),
            }
        }
        Ok(Hello {
            qpn: qpn.ok_or_else(bad)?,
            gid: gid.ok_or_else(bad)?,
            addr: addr.ok_or_else(bad)?,
            rkey: rkey.ok_or_else(bad)?,
            len: len.ok_or_else(bad)?,
        })
    }
}

/// A line-based control connection to the other guest.
#[derive(Debug)]
pub struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    timeout: Duration,
}

impl Control {
    /// Wraps a connected stream; every read and write gives up after `timeout`.
    pub fn new(stream: TcpStream, timeout: Duration) -> Result<Control, String> {
        let setup = |e: std::io::Error| format!("cannot set up the TCP connection: {e}");
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        stream.set_write_timeout(Some(timeout)).map_err(setup)?;
        let writer = stream.try_clone().map_err(setup)?;
        Ok(Control {
            reader: BufReader::new(stream),
            writer,
            timeout,
        })
    }

    /// Sends one line.
    pub fn send(&mut self, line: &str) -> Result<(), String> {
        debug_assert!(!line.contains('\n'));
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("cannot send {line:?} to the other guest: {e}"))
    }

    /// Receives one line; an `ERR ...` line from the other guest becomes an error.
    pub fn recv(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(
                "the other guest closed the TCP connection (it probably failed: see its message)"
                    .into(),
            ),
            Ok(_) => {
                let line = line.trim_end().to_owned();
                match line.strip_prefix("ERR ") {
                    Some(reason) => Err(format!("the other guest failed: {reason}")),
                    None => Ok(line),
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(format!(
                    "the other guest sent nothing for {} s (is it stuck?)",
                    self.timeout.as_secs()
                ))
            }
            Err(e) => Err(format!("cannot read from the other guest: {e}")),
        }
    }

    /// Receives one line and checks it is `expected`.
    pub fn expect(&mut self, expected: &str) -> Result<(), String> {
        let line = self.recv()?;
        if line == expected {
            Ok(())
        } else {
            Err(format!(
                "the other guest sent {line:?} where {expected:?} was due"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips() {
        let h = Hello {
            qpn: 0x1_0002,
            gid: Gid::from_ipv4([10, 0, 0, 2]),
            addr: 0x7f00_1234_5000,
            rkey: 0xabc0_0001,
            len: 2 << 20,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        assert!(Hello::decode("HELLO qpn=1").is_err());
        assert!(Hello::decode("GOODBYE").is_err());
    }
}
