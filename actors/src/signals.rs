//! Signals as async streams: signal-hook writes a byte to a socket pair from
//! the handler, and the read end is awaited like any other socket.

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

pub struct SignalPipe {
    reader: UnixStream,
    buf: [u8; 64],
}

impl SignalPipe {
    pub fn register(signal: libc::c_int) -> io::Result<SignalPipe> {
        let (read_end, write_end) = StdUnixStream::pair()?;
        read_end.set_nonblocking(true)?;
        write_end.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal, write_end)?;
        Ok(SignalPipe {
            reader: UnixStream::from_std(read_end)?,
            buf: [0; 64],
        })
    }

    /// Waits for the signal (several deliveries may be folded into one).
    pub async fn recv(&mut self) -> io::Result<()> {
        loop {
            match self.reader.read(&mut self.buf).await {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "signal pipe closed",
                    ))
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
