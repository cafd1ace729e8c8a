//! Dead letters (step 4 of a flush): every message a batch did not count goes to
//! `<topic>.dlq` with where it came from, and a flush waits for every delivery.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::producer::future_producer::OwnedDeliveryResult;

use topk::counting::batch::{Batch, DeadLetter};

use crate::events;
use crate::flush::FlushError;
use crate::worker::Worker;

/// Payload bytes kept in a dead letter the broker refused as too large.
const DEAD_LETTER_MAX_PAYLOAD: usize = 64 * 1024;

impl Worker {
    /// Produces the dead letters of `batches` and waits for every delivery; returns how many.
    pub(crate) async fn produce_dead_letters(
        &self,
        batches: &[&Batch],
    ) -> Result<usize, FlushError> {
        let letters: Vec<(i32, &DeadLetter)> = batches
            .iter()
            .flat_map(|batch| batch.dead_letters.iter().map(|l| (batch.partition, l)))
            .collect();
        let results = join_all(
            letters
                .iter()
                .map(|(partition, letter)| self.send_dead_letter(*partition, letter, None)),
        )
        .await;
        // A dead letter is its message plus four headers: a message the broker took into
        // `plays` just under its size limit can be refused from `<topic>.dlq`. Resent with its
        // payload cut to `DEAD_LETTER_MAX_PAYLOAD` bytes and its full size in a header, so that
        // the partition moves on; the full message stays in `plays` (and in the archive).
        let too_large: Vec<(i32, &DeadLetter)> = letters
            .iter()
            .zip(&results)
            .filter(|(_, result)| {
                matches!(
                    result,
                    Err((
                        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                        _
                    ))
                )
            })
            .map(|(letter, _)| *letter)
            .collect();
        let retries = too_large.iter().map(|(partition, letter)| {
            self.send_dead_letter(*partition, letter, Some(DEAD_LETTER_MAX_PAYLOAD))
        });
        let retried = join_all(retries).await;
        let dead_letters = results.len();
        for result in results {
            match result {
                Ok(_)
                | Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                }
                Err((error, _)) => return Err(FlushError::DeadLetters(error)),
            }
        }
        for ((partition, letter), result) in too_large.iter().zip(retried) {
            match result {
                Ok(_) => {}
                // Even the cut letter is refused (a broker limit under 64 KiB): the partition
                // must not stall for it; the message stays in `plays` and the archive.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    events::dead_letter_dropped(*partition, letter.offset);
                }
                Err((error, _)) => return Err(FlushError::DeadLetters(error)),
            }
        }
        Ok(dead_letters)
    }

    /// Sends one dead letter: its key and payload (cut to `cut_to` bytes, with the original
    /// size in a `truncated_from_bytes` header, when given) and where it came from.
    async fn send_dead_letter(
        &self,
        partition: i32,
        letter: &DeadLetter,
        cut_to: Option<usize>,
    ) -> OwnedDeliveryResult {
        let partition = partition.to_string();
        let offset = letter.offset.to_string();
        let payload = letter.payload.as_deref();
        let original_len = payload.map_or(0, <[u8]>::len).to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "reason",
                value: Some(letter.reason.as_str()),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(self.topic.as_str()),
            })
            .insert(Header {
                key: "source_partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "source_offset",
                value: Some(offset.as_str()),
            });
        if cut_to.is_some() {
            headers = headers.insert(Header {
                key: "truncated_from_bytes",
                value: Some(original_len.as_str()),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.dlq_topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        if let Some(payload) = payload {
            let len = cut_to.map_or(payload.len(), |cut| cut.min(payload.len()));
            record = record.payload(&payload[..len]);
        }
        self.producer.send(record, Duration::from_secs(30)).await
    }
}
