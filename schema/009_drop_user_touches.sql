-- user_touches (006, rebuilt by 008) told the refresher which users a flush or a backfill
-- changed. Since issue 17 those users are published as touches on the Kafka topic
-- <topic>.touches, which the refreshers consume as a group (ARCHITECTURE.md, "Refreshers as
-- a consumer group"), and nothing reads the table any more: no writer fills it either.
DROP TABLE IF EXISTS user_touches;
