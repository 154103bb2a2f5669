//! The in-process link of `confab dev`: the gateway's [`CellConnector`] backed directly by a
//! [`Cell`] in the same process. The messages are the same `confab_shared::link` messages that
//! travel over the network between processes; only the transport differs.

use async_trait::async_trait;
use confab_cells::{Cell, LinkHandle};
use confab_directory::CellRecord;
use confab_gateway::{CellConnection, CellConnector, LinkError, LinkSink};
use confab_shared::link::ToCell;
use tokio::sync::mpsc;

/// Messages a cell may queue for the gateway before the link counts as overloaded.
const LINK_QUEUE: usize = 64 * 1024;

/// Connects the gateway to the cell of this process.
pub struct InProcessConnector {
    pub cell: Cell,
    pub gateway: String,
}

struct InProcessSink(LinkHandle);

impl LinkSink for InProcessSink {
    fn send(&self, message: ToCell) -> Result<(), LinkError> {
        self.0.send(message);
        Ok(())
    }
}

#[async_trait]
impl CellConnector for InProcessConnector {
    async fn connect(&self, _cell: &CellRecord) -> Result<CellConnection, LinkError> {
        let (outbound, inbound) = mpsc::channel(LINK_QUEUE);
        let handle = self.cell.connect(self.gateway.clone(), outbound);
        let lost = handle.lost_token();
        Ok(CellConnection {
            sink: Box::new(InProcessSink(handle)),
            inbound,
            lost,
        })
    }
}
